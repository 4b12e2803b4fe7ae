"""Next-token choice: logit bias and presence/frequency penalties (OpenAI's definitions), then
greedy, temperature, top-k, top-p."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # logits[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0), over the
    # tokens generated so far (not the prompt), as OpenAI defines them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs added to the logits before anything else.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def adjusted(logits: np.ndarray, cfg: SamplingConfig, counts: Mapping[int, int]) -> np.ndarray:
    """``logits`` with the bias and the penalties applied (a copy; the input is left alone)."""
    out = logits.astype(np.float64, copy=True)
    for token, bias in cfg.logit_bias:
        if 0 <= token < out.shape[0]:
            out[token] += bias
    if counts and (cfg.presence_penalty or cfg.frequency_penalty):
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        seen = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        inside = ids < out.shape[0]
        out[ids[inside]] -= cfg.frequency_penalty * seen[inside] + cfg.presence_penalty
    return out


def choose_token(
    logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, counts: Mapping[int, int] | None = None
) -> int:
    """Pick one token id from a [vocab] logits row; ``counts``: tokens generated so far."""
    if cfg.adjusts:
        logits = adjusted(logits, cfg, counts or {})
    if cfg.greedy:
        return int(np.argmax(logits))
    # The maximum subtracted before dividing: a temperature as small as a subnormal float (the
    # schema allows any > 0) sends the others to -inf, where dividing first overflowed the
    # largest to inf and inf - inf made the probabilities NaN (a 500).
    scores = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # to -inf: those tokens' probability is 0
        scores = (scores - scores.max()) / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[0]:
        kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores)
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cumulative, cfg.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[0], p=probs))
