"""Token ids → text deltas that are final: stop sequences cut, partial UTF-8 and stop prefixes held back.

Shared by the edge's generation loop and the cloud pool's batch engine, so a stop sequence or a
multi-byte character behaves the same wherever a request is served.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalText:
    """Feed generated token ids one at a time; get back the text that can be sent now."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False
        # Text that could still become the start of a stop sequence is not sent yet.
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        """The new final text after ``token``; sets ``stopped`` when a stop sequence appeared."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        return self._advance(text[: len(text.rstrip("\ufffd")) - self._holdback])

    def finish(self) -> str:
        """Whatever was held back, once generation ended without a stop sequence."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.tokens))

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
