"""Relaying an upstream's server-sent events so that a broken stream ends honestly.

An upstream that dies mid-answer must not look like an answer that ended: the client would
take a cut-off text for a whole one. The relay forwards whole events only; when the upstream
breaks, or ends without ``data: [DONE]``, the incomplete tail is dropped and the stream ends
with an OpenAI-style error event (no ``[DONE]``), which the ``openai`` client raises on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable

DONE = b"data: [DONE]"
# The end marker and an upstream's report of its own failure (which ends a stream honestly),
# wherever they stand in a run of events; the space after "data:" is optional in SSE.
_ENDS = re.compile(rb'^data: ?(\[DONE\]|\{"error")', re.MULTILINE)
_DONE_LINE = re.compile(rb"^data: ?\[DONE\]\s*$")
# The end marker as a whole event in a run of normalised events.
_DONE_EVENT = re.compile(rb"^data: ?\[DONE\][ \t]*\n\n", re.MULTILINE)
# After the end marker, how long the rest of the upstream's answer (the end of its chunked body)
# is waited for, so its connection can be used again; a server that never ends its answer after
# [DONE] would otherwise hold the client until the read timeout.
AFTER_DONE_S = 0.25


def is_done(event: bytes) -> bool:
    """Whether one event is the end marker."""
    return _DONE_LINE.match(event.strip()) is not None


def ends_stream(events: bytes) -> bool:
    """Whether a run of whole events holds the end marker or an error event."""
    return _ENDS.search(events) is not None


def normalised(pending: bytes, chunk: bytes) -> bytes:
    """``pending + chunk`` with CRLF line ends made LF, a CR and its LF split across two chunks
    included."""
    return (pending + chunk).replace(b"\r\n", b"\n")


def error_event(message: str, code: str = "upstream_stream_broken") -> bytes:
    body = {"error": {"message": message, "type": "server_error", "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def describe_error(exc: BaseException) -> str:
    """A failed hop in words (a timeout's own message is empty)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


async def relay_events(
    chunks: AsyncIterator[bytes],
    *,
    errors: tuple[type[BaseException], ...],
    on_break: Callable[[str, BaseException | None], None],
) -> AsyncIterator[bytes]:
    """Whole events from ``chunks``, up to ``[DONE]`` (nothing after it is the client's);
    ``on_break(why, failure)`` is called once if the stream broke (``failure`` None: it ended
    without ``[DONE]``)."""
    pending = b""
    done = False
    why: str | None = None
    failure: BaseException | None = None
    try:
        async for chunk in chunks:
            pending = normalised(pending, chunk)
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[: cut + 2], pending[cut + 2 :]
            if ends_stream(events):
                done = True
                if (end := _DONE_EVENT.search(events)) is not None:
                    yield events[: end.end()]
                    with contextlib.suppress(TimeoutError, *errors):
                        async with asyncio.timeout(AFTER_DONE_S):
                            async for _ in chunks:
                                pass
                    return
            yield events
    except errors as exc:
        why, failure = describe_error(exc), exc
    if not done:
        why = why or "the upstream ended the stream without [DONE]"
        on_break(why, failure)
        yield error_event(f"the answer broke off upstream ({why}); it is incomplete")
