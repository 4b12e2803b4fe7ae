"""A package's evaluation set run on a loaded graph: teacher-forced agreement with the reference.

Each case is fed whole (prompt, then the reference answer but its last token) in one pass; at
every answer position the graph's top choice is compared with the reference's next token. Unlike
free greedy decoding, one early difference does not change everything after it, so the figure
measures the model, not where its first near-tie fell: a faithful int8 graph agrees on most
tokens, a broken or perturbed one on few. The packager computes it for the shipped graph on its
own machine (``expected_agreement``); a device computes it again after loading the package.
"""

from __future__ import annotations

import numpy as np

from edge_agent.runtime.session import OnnxCausalLM
from shared.manifest import EvalSet


def foreign_ids(evaluation: EvalSet, vocab_size: int) -> int:
    """How many of the set's ids are outside this vocabulary (a set made for another tokenizer)."""
    return sum(1 for c in evaluation.cases for i in (*c.prompt_ids, *c.answer_ids) if not 0 <= i < vocab_size)


def teacher_forced_agreement(model: OnnxCausalLM, evaluation: EvalSet) -> tuple[float, int]:
    """(share of reference answer tokens that are the graph's top choice, tokens compared)."""
    agree = total = 0
    for case in evaluation.cases:
        if len(case.prompt_ids) + len(case.answer_ids) > model.io.context_length:
            continue  # not this graph's context: the set was made for a larger one
        decoder = model.decoder(len(case.prompt_ids) + len(case.answer_ids))
        # The prompt's last row only, then one row per answer token: memory grows with the
        # answer, not with the prompt.
        rows = [decoder.step(case.prompt_ids, last_only=True)[-1:]]
        if len(case.answer_ids) > 1:
            rows.append(decoder.step(case.answer_ids[:-1]))
        chosen = np.argmax(np.concatenate(rows), axis=-1)
        agree += int(np.sum(chosen == np.asarray(case.answer_ids)))
        total += len(case.answer_ids)
    return (agree / total if total else 0.0), total
