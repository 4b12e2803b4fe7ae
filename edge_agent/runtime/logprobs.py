"""Log probabilities of generated tokens (OpenAI's ``logprobs``/``top_logprobs``).

A token's logprob is taken from the model's own distribution at that step — the log-softmax of
the raw logits, before logit bias, penalties, temperature, top-k/top-p or a grammar mask change
what is sampled — as vLLM reports them by default. So the greedy token is always the most likely
one, and the numbers describe the model, not the sampler.

Shared by the edge's decode loop and the cloud pool's batch engine. Each token's logprob is
handed to the stream with the text delta it produced (:class:`Scored`), and all of them with the
final result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The most alternatives a request may ask for per token (OpenAI's limit for chat).
MAX_TOP_LOGPROBS = 20
# JSON has no -inf: a token the model rules out entirely is reported with this (as vLLM does).
_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    token: bytes
    logprob: float
    # The most likely tokens at this step, most likely first (as many as the request asked for).
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Scored:
    """A stream item: the logprobs of the tokens behind the text delta that follows it."""

    tokens: tuple[TokenLogprob, ...]


class Scorer:
    """One request's logprobs over its decode loop."""

    def __init__(self, top_n: int, token_bytes: Callable[[int], bytes]) -> None:
        self.top_n = top_n
        self.token_bytes = token_bytes
        self.scored: list[TokenLogprob] = []
        self._sent = 0

    def add(self, logits: np.ndarray, token: int) -> None:
        """Score ``token``, chosen from the raw ``logits`` row [vocab] of its step."""
        row = logits.astype(np.float64, copy=False)
        peak = float(np.max(row))
        logz = peak + float(np.log(np.sum(np.exp(row - peak))))
        top: tuple[tuple[bytes, float], ...] = ()
        if self.top_n:
            n = min(self.top_n, row.shape[0])
            best = np.argpartition(-row, n - 1)[:n]
            best = best[np.argsort(-row[best], kind="stable")]
            top = tuple((self.token_bytes(int(t)), _finite(float(row[t]) - logz)) for t in best)
        self.scored.append(TokenLogprob(self.token_bytes(token), _finite(float(row[token]) - logz), top))

    def flush(self, upto: int | None = None) -> Scored | None:
        """The tokens scored since the last flush (up to the first ``upto``), to go out with the
        text delta they made."""
        end = len(self.scored) if upto is None else min(upto, len(self.scored))
        if self._sent >= end:
            return None
        fresh = Scored(tuple(self.scored[self._sent : end]))
        self._sent = end
        return fresh


def _finite(value: float) -> float:
    return value if value > _FLOOR else _FLOOR
