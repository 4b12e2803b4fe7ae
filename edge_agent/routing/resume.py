"""Streams that survive a fallback: a cloud chat stream that breaks mid-answer is finished here.

The edge asks the cloud for each chunk's token ids (vLLM's ``return_token_ids``, which the pool
also implements) and reads every event it relays. When the stream breaks — the connection drops,
the gateway reports the break with an error event, or the stream ends without ``[DONE]`` — the
local model continues the same answer from exactly the tokens the client has (or from their text
when the cloud sent no ids), and its chunks go out as more chunks of the same stream: same id and
model name, no second ``role``, ``served_by: "cloud→local"`` on the last chunks, then ``[DONE]``.
The client sees one well-formed stream. When the local side cannot take over (no model for this
name, queue full, context too small) the stream ends with the error event as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from edge_agent.runtime.generator import Resume
from edge_agent.serving.sse import DONE, describe_error, error_event, is_done, normalised

log = logging.getLogger(__name__)

CLOUD_TO_LOCAL = "cloud→local"
LOCAL_TO_CLOUD = "local→cloud"


class Transcript:
    """What the client has received of one chat stream, event by event."""

    def __init__(self) -> None:
        self.chunk_id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.parts: list[str] = []
        # The ids of every token sent so far; None once a content chunk came without them.
        self.tokens: list[int] | None = []
        self._unfinished: set[int] = set()  # choices seen without their finish_reason yet
        self._seen_choice = False
        self.resumable = True  # False after something a continuation could not repeat
        self.chunks = 0

    @property
    def finished(self) -> bool:
        """Every choice sent its finish_reason: the answer is whole."""
        return self._seen_choice and not self._unfinished

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def observe(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if self.chunk_id is None:
            self.chunk_id = str(chunk.get("id") or "")
            self.model = str(chunk.get("model") or "")
            created = chunk.get("created")
            self.created = created if isinstance(created, int) else None
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                self.resumable = False  # which answer it belongs to is unknown
                continue
            self._seen_choice = True
            if choice.get("finish_reason") is not None:
                self._unfinished.discard(index)
            else:
                self._unfinished.add(index)
            if index != 0:
                self.resumable = False  # n > 1: one answer cannot stand in for several
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            if delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning"):
                self.resumable = False  # not plain answer text: the local model could not go on with it
            raw = choice.get("token_ids")
            ids = [i for i in raw if isinstance(i, int)] if isinstance(raw, list) else None
            has_ids = ids is not None and raw is not None and len(ids) == len(raw)
            # vLLM sends ids without text too (a held-back piece of a character or a stop prefix).
            if self.tokens is not None and has_ids and ids is not None:
                self.tokens.extend(ids)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.parts.append(content)
                if not has_ids:
                    self.tokens = None

    def resume(self) -> Resume:
        return Resume(self.text, tuple(self.tokens) if self.tokens is not None else None)


# How a continuation is obtained: the local stream's events, or None (with the reason logged)
# when the local side cannot take over.
Continue = Callable[[Transcript], Awaitable[AsyncIterator[str] | None]]


async def resumable_events(
    chunks: AsyncIterator[bytes],
    *,
    errors: tuple[type[BaseException], ...],
    on_break: Callable[[str], None],
    take_over: Continue,
    strip_token_ids: bool,
    on_resumed: Callable[[], None],
) -> AsyncIterator[bytes]:
    """The cloud's events one at a time (token ids dropped when the client did not ask for them);
    after a break, the local continuation's, or the error event when there is none."""
    transcript = Transcript()
    pending = b""
    why: str | None = None
    reported: bytes | None = None  # the cloud's own error event, passed on if no one continues
    try:
        async for chunk in chunks:
            pending = normalised(pending, chunk)
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.strip():
                    continue
                if is_done(event):
                    yield DONE + b"\n\n"
                    return
                payload = _payload(event)
                if payload is None:
                    yield event + b"\n\n"  # a comment or keep-alive: not ours to judge
                    continue
                if payload is _GARBLED:
                    # Passed on, the client's own parser would fail on it before any error
                    # event could say what happened.
                    why = "the cloud sent an event that is not a JSON object"
                    break
                if "error" in payload:
                    # The gateway's report that its replica broke off (or any upstream error):
                    # not sent on, the answer continues here instead.
                    reported = event + b"\n\n"
                    why = f"the cloud reported: {_message(payload)}"
                    break
                transcript.observe(payload)
                if strip_token_ids:
                    payload.pop("prompt_token_ids", None)
                    for choice in payload.get("choices") or ():
                        if isinstance(choice, dict):
                            choice.pop("token_ids", None)
                    event = b"data: " + json.dumps(payload, ensure_ascii=False).encode()
                yield event + b"\n\n"
            if why is not None:
                break
    except errors as exc:
        why = describe_error(exc)
    why = why or "the cloud ended the stream without [DONE]"
    on_break(why)
    if transcript.finished:
        # Every token arrived; only the end marker was lost.
        yield DONE + b"\n\n"
        return
    continuation = await take_over(transcript) if transcript.resumable else None
    if continuation is None:
        yield reported or error_event(f"the answer broke off upstream ({why}); it is incomplete")
        return
    on_resumed()
    log.info(
        "a cloud stream broke off after %d chunks (%s); continued locally from %s",
        transcript.chunks,
        why,
        "its token ids" if transcript.tokens is not None else "its text",
    )
    try:
        async for local in continuation:
            yield local.encode()
    finally:
        # A client gone mid-continuation: the local generation must hear of it now.
        aclose = getattr(continuation, "aclose", None)
        if aclose is not None:
            await aclose()


_GARBLED: dict[str, Any] = {}  # the payload of a data event that is not a JSON object


def _payload(event: bytes) -> dict[str, Any] | None:
    """An event's JSON object; None for an event without data (a comment, a keep-alive);
    ``_GARBLED`` for data that is not a JSON object."""
    data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
    if not data:
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return _GARBLED
    return parsed if isinstance(parsed, dict) else _GARBLED


def _message(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "error")
    return str(error)
