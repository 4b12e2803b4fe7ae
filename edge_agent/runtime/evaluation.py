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


def teacher_forced_agreement(model: OnnxCausalLM, evaluation: EvalSet) -> tuple[float, int]:
    """(share of reference answer tokens that are the graph's top choice, tokens compared)."""
    agree = total = 0
    for case in evaluation.cases:
        ids = case.prompt_ids + case.answer_ids
        if len(ids) > model.io.context_length:
            continue  # not this graph's context: the set was made for a larger one
        logits = model.sequence_logits(ids[:-1])
        start = len(case.prompt_ids) - 1
        chosen = np.argmax(logits[start:], axis=-1)
        agree += int(np.sum(chosen == np.asarray(case.answer_ids)))
        total += len(case.answer_ids)
    return (agree / total if total else 0.0), total
