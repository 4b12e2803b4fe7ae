"""Text ↔ token ids: prompts encoded by their kind, generated ids turned into final text deltas
(stop sequences cut, partial UTF-8 and stop prefixes held back).

Shared by the edge's generation loop and the cloud pool's batch engine, so a stop sequence or a
multi-byte character behaves the same wherever a request is served.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tokenizers import Tokenizer


@dataclass(frozen=True)
class Prompt:
    """Prompt text and how to encode it: chat prompts carry their special tokens already."""

    text: str
    add_special_tokens: bool = True
    # The request field it was made from, which an error about it names ("messages" for a chat).
    param: str = "prompt"

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        ids: list[int] = tokenizer.encode(self.text, add_special_tokens=self.add_special_tokens).ids
        return ids


class IncrementalText:
    """Feed generated token ids one at a time; get back the text that can be sent now.

    Decoding is incremental by prefix offsets (as vLLM's detokenizer does): each step decodes only
    the few tokens since the last complete character, not the whole output, and a token that ends
    inside a multi-byte character waits for the next one. The text equals decoding all the ids at
    once (special tokens skipped), which is what transformers' ``decode`` returns.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)  # an empty stop sequence would match everywhere
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False
        self._text = ""  # decoded so far, complete characters only
        self._prefix = 0  # tokens before this index are already in _text, with context from here
        self._read = 0  # tokens before this index are already in _text
        # Text that could still become the start of a stop sequence is not sent yet.
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids_sent = 0  # tokens before this index went out with a delta (token_ids)
        # Where each token's text starts in _text (a token inside a multi-byte character: where
        # that character starts); nondecreasing.
        self._starts: list[int] = []

    def resume(self, tokens: list[int], emitted: str) -> bool:
        """Continue an answer another server began: ``tokens`` were generated and the client has
        ``emitted`` (their text, perhaps short of a held-back tail). False when the tokens do
        not spell that text (another tokenizer made them): nothing is changed then."""
        probe = IncrementalText(self.tokenizer, self.stop)
        for token in tokens:
            probe.push(token)
        if probe.stopped or not (probe._text + probe._pending()).startswith(emitted):
            return False
        self.__dict__.update(probe.__dict__)
        self.emitted = emitted
        self._ids_sent = len(tokens)
        return True

    def take_ids(self) -> list[int]:
        """The ids generated since the last call: the tokens behind the delta about to go out."""
        ids = self.tokens[self._ids_sent :]
        self._ids_sent = len(self.tokens)
        return ids

    def push(self, token: int) -> str:
        """The new final text after ``token``; sets ``stopped`` when a stop sequence appeared."""
        self.tokens.append(token)
        self._starts.append(len(self._text))
        new = self._pending()
        if new and not new.endswith("\ufffd"):
            self._text += new
            self._prefix, self._read = self._read, len(self.tokens)
        # A stop sequence can only start in the part not yet emitted (or the held-back tail).
        start = max(0, len(self.emitted) - self._holdback)
        cut = _first_stop(self._text, self.stop, start)
        if cut is not None:
            self.stopped = True
            return self._advance(self._text[:cut])
        # max(0, …): while the text is shorter than the hold-back, nothing goes out (a negative
        # end would slice from the back and send the start of a stop sequence).
        return self._advance(self._text[: max(0, len(self._text) - self._holdback)])

    def covered(self) -> int:
        """How many of the tokens have text in what was emitted: the rest are held back with
        their text, and once a stop sequence ended the answer, they are the stop's (or after
        it), not the answer's."""
        return bisect.bisect_left(self._starts, len(self.emitted))

    def finish(self) -> str:
        """Whatever was held back, once generation ended without a stop sequence."""
        if self.stopped:
            return ""
        return self._advance(self._text + self._pending())

    def _pending(self) -> str:
        """Text of the tokens after ``_read``, decoded with the context of those from ``_prefix``."""
        if self._read == len(self.tokens):
            return ""
        before: str = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        after: str = self.tokenizer.decode(self.tokens[self._prefix :])
        return after[len(before) :]

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


def _first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
