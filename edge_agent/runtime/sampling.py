"""Next-token choice: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Pick one token id from a [vocab] logits row."""
    if cfg.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < scores.shape[0]:
        kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    scores -= scores.max()
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
