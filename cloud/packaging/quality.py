"""How much quantization changed a model, in the figures the manifest's quality report carries.

- Perplexity of the fp32 and the shipped graph on held-out text (code by default) and on English
  prose (the prose of Python's reference manual as ``pydoc_data`` ships it, code blocks removed):
  quantization harms the two differently, and chat is closer to prose.
- Greedy agreement on :data:`CHAT_PROMPTS`, each rendered with the model's own chat template:
  the share of prompts whose shipped greedy answer is token for token fp32's, and where the
  others first depart. The same prompts are the parity set that the tests run against
  transformers, so one list says what "answers the same" means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.evaluation import foreign_ids, teacher_forced_agreement
from edge_agent.runtime.generator import GenerationParams, TextGenerator, token_budget
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.session import OnnxCausalLM, perplexity
from shared.errors import PackagingError
from shared.manifest import EvalCase, EvalSet, GreedyAgreement, IOSignature, PerplexityFigures

Message = dict[str, str]

# Facts, arithmetic, code, instructions, a system prompt, multi-turn conversations.
CHAT_PROMPTS: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "What is the capital of Japan?"},),
    ({"role": "user", "content": "Who wrote the play Romeo and Juliet?"},),
    ({"role": "user", "content": "What is the largest planet in our solar system?"},),
    ({"role": "user", "content": "At what temperature does water boil at sea level, in Celsius?"},),
    ({"role": "user", "content": "How many days are there in a week?"},),
    ({"role": "user", "content": "What is 2 + 2?"},),
    ({"role": "user", "content": "What is 12 times 12?"},),
    ({"role": "user", "content": "If I have 3 apples and eat one, how many are left?"},),
    ({"role": "user", "content": "Write a Python function that returns the square of a number."},),
    ({"role": "user", "content": "How do I reverse a list in Python?"},),
    ({"role": "user", "content": "What does HTML stand for?"},),
    ({"role": "user", "content": "Give me three tips for sleeping better."},),
    ({"role": "user", "content": "Translate 'thank you' into Spanish."},),
    ({"role": "user", "content": "Explain in one sentence what photosynthesis is."},),
    ({"role": "user", "content": "Name a primary color."},),
    (
        {"role": "system", "content": "You are a pirate. Answer every question like a pirate would."},
        {"role": "user", "content": "What is your favourite food?"},
    ),
    (
        {"role": "system", "content": "Answer with a single word."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ),
    (
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": "Nice to meet you, Alice! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ),
    (
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "And what is the capital of Germany?"},
    ),
    (
        {"role": "system", "content": "You are a helpful assistant that answers briefly."},
        {"role": "user", "content": "Why is the sea salty?"},
    ),
    ({"role": "user", "content": "Hi! How are you today?"},),
    ({"role": "user", "content": "Write a haiku about the ocean."},),
    ({"role": "user", "content": "¿Cuál es la capital de España?"},),
)
GREEDY_MAX_NEW_TOKENS = 48
PROSE_MIN_PARAGRAPH = 200


def prose_text(max_chars: int = 60_000) -> str:
    """English prose from Python's reference manual (``pydoc_data``): paragraphs without code."""
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.strip("\n").split("\n")
            # Indented lines are code or grammar; brackets and operators mark inline code.
            if any(line.startswith(" ") for line in lines) or len(block) < PROSE_MIN_PARAGRAPH:
                continue
            if re.search(r"[{}\[\]=<>*|]|::", block):
                continue
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)[:max_chars]


@dataclass(frozen=True)
class GraphPair:
    """The fp32 graph and the shipped one, with what it takes to drive them."""

    fp32_graph: Path
    shipped_graph: Path
    io: IOSignature
    tokenizer: Tokenizer


def perplexity_figures(pair: GraphPair, text: str, source: str, max_tokens: int) -> PerplexityFigures:
    ids = pair.tokenizer.encode(text).ids[:max_tokens]
    if len(ids) < 16:
        raise PackagingError("evaluation text is too short (needs at least 16 tokens)", tokens=len(ids))
    window = min(pair.io.context_length, 256)
    ppl_fp32, scored = perplexity(OnnxCausalLM(pair.fp32_graph, pair.io), ids, window)
    ppl_ship = ppl_fp32
    if pair.shipped_graph != pair.fp32_graph:
        ppl_ship, _ = perplexity(OnnxCausalLM(pair.shipped_graph, pair.io), ids, window)
    return PerplexityFigures(
        eval_text=source,
        eval_tokens=scored,
        perplexity_fp32=ppl_fp32,
        perplexity_shipped=ppl_ship,
        relative_change=(ppl_ship - ppl_fp32) / ppl_fp32,
    )


def greedy_answers(
    generator: TextGenerator, template: ChatTemplate, max_new_tokens: int = GREEDY_MAX_NEW_TOKENS
) -> list[list[int]]:
    """The greedy answer (token ids, up to the end of the turn) to every chat prompt."""
    params = GenerationParams(max_tokens=max_new_tokens, sampling=SamplingConfig(temperature=0.0))
    answers = []
    for messages in CHAT_PROMPTS:
        prompt_ids = generator.check_prompt(template.prompt(list(messages)), params)
        budget = token_budget(len(prompt_ids), generator.context_length, params, "model's")
        answers.append(list(generator.token_ids(prompt_ids, budget, params)))
    return answers


def fp32_answers(pair: GraphPair, template: ChatTemplate) -> list[list[int]]:
    return greedy_answers(TextGenerator(OnnxCausalLM(pair.fp32_graph, pair.io), pair.tokenizer), template)


def evaluation_set(
    pair: GraphPair,
    template: ChatTemplate,
    reference: str,
    answers: list[list[int]],
    reuse: EvalSet | None = None,
) -> tuple[EvalSet, float]:
    """The package's evaluation set and the shipped graph's agreement with it here.

    A new set holds :data:`CHAT_PROMPTS` with the fp32 graph's greedy ``answers``, and its bar
    (``expected_agreement``) is the shipped graph's agreement. ``reuse`` (an earlier version's
    set) is carried unchanged, bar included: the new version is held to the same answers as well
    as the old one met them, whatever it scores itself."""
    if reuse is None:
        params = GenerationParams(max_tokens=GREEDY_MAX_NEW_TOKENS, sampling=SamplingConfig(temperature=0.0))
        generator = TextGenerator(OnnxCausalLM(pair.fp32_graph, pair.io), pair.tokenizer)
        cases = [
            EvalCase(
                prompt_ids=generator.check_prompt(template.prompt(list(messages)), params), answer_ids=answer
            )
            for messages, answer in zip(CHAT_PROMPTS, answers, strict=True)
            if answer
        ]
        if not cases:
            raise PackagingError("the fp32 graph answers every evaluation prompt with nothing at all")
        draft = EvalSet(reference=reference, cases=cases, expected_agreement=1.0)
    else:
        if foreign := foreign_ids(reuse, pair.io.vocab_size):
            raise PackagingError(
                f"the evaluation set to carry holds {foreign} token id(s) outside this model's vocabulary "
                f"(made for another tokenizer)",
                reference=reuse.reference,
            )
        draft = reuse
    measured, _ = teacher_forced_agreement(OnnxCausalLM(pair.shipped_graph, pair.io), draft)
    if reuse is not None:
        return reuse, measured
    return draft.model_copy(update={"expected_agreement": measured}), measured


def greedy_agreement(
    pair: GraphPair, template: ChatTemplate, reference: list[list[int]] | None = None
) -> GreedyAgreement:
    reference = reference if reference is not None else fp32_answers(pair, template)
    shipped = greedy_answers(
        TextGenerator(OnnxCausalLM(pair.shipped_graph, pair.io), pair.tokenizer), template
    )
    firsts = [first_difference(a, b) for a, b in zip(reference, shipped, strict=True)]
    differing = [i for i in firsts if i is not None]
    return GreedyAgreement(
        prompts=len(CHAT_PROMPTS),
        max_new_tokens=GREEDY_MAX_NEW_TOKENS,
        identical=len(firsts) - len(differing),
        share=(len(firsts) - len(differing)) / len(firsts),
        mean_first_difference=sum(differing) / len(differing) if differing else None,
    )


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
