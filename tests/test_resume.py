"""The relay that lets a broken cloud stream be finished locally (edge_agent/routing/resume.py),
on scripted event streams: fast checks of the parsing and the hand-over; the real thing (a pool
replica SIGKILLed mid-answer) is in tests/test_fallback.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from edge_agent.routing.resume import Transcript, resumable_events
from edge_agent.serving.sse import relay_events


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _chunk(content: str | None = None, ids: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": extra.pop("finish", None)}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "chatcmpl-1", "model": "m", "created": 7, "choices": [choice], **extra}


async def _pieces(data: bytes, size: int, fail: bool = False) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
    if fail:
        raise aiohttp.ClientPayloadError("connection reset")


def _run(
    data: bytes, *, size: int = 7, fail: bool = False, strip: bool = True, local_model: bool = True
) -> tuple[bytes, list[Transcript], list[str]]:
    handed: list[Transcript] = []
    breaks: list[str] = []

    async def take_over(t: Transcript) -> AsyncIterator[str] | None:
        handed.append(t)
        if not local_model:
            return None

        async def local() -> AsyncIterator[str]:
            yield 'data: {"local": true}\n\n'
            yield "data: [DONE]\n\n"

        return local()

    async def go() -> bytes:
        out = b""
        async for part in resumable_events(
            _pieces(data, size, fail),
            errors=(aiohttp.ClientError,),
            on_break=breaks.append,
            take_over=take_over,
            strip_token_ids=strip,
            on_resumed=lambda: None,
        ):
            out += part
        return out

    return asyncio.run(go()), handed, breaks


def test_a_whole_stream_passes_with_the_ids_it_was_not_asked_for_stripped() -> None:
    first = {**_chunk("", [], prompt_token_ids=[1, 2, 3])}
    first["choices"][0]["delta"]["role"] = "assistant"
    data = (
        _event(first)
        + _event(_chunk("Hel", [5]))
        + _event(_chunk("lo", [6], finish="stop"))
        + b"data: [DONE]\n\n"
    )
    out, handed, breaks = _run(data)
    assert handed == [] and breaks == []
    assert out.endswith(b"data: [DONE]\n\n") and b"token_ids" not in out
    texts = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in out.split(b"\n\n")[:3]]
    assert texts == ["", "Hel", "lo"]
    kept, _, _ = _run(data, strip=False)
    assert b'"token_ids": [5]' in kept


def test_a_break_hands_over_exactly_what_the_client_has() -> None:
    # vLLM sends ids without text for a held-back piece: they belong to the answer all the same.
    data = _event(_chunk("The", [10])) + _event(_chunk(None, [11])) + _event(_chunk(" cap", [12, 13]))
    out, handed, breaks = _run(data, size=5, fail=True)
    assert len(breaks) == 1 and "ClientPayloadError" in breaks[0]
    (t,) = handed
    assert t.text == "The cap" and t.tokens == [10, 11, 12, 13] and t.chunk_id == "chatcmpl-1"
    assert t.resume().tokens == (10, 11, 12, 13)
    assert out.endswith(b'data: {"local": true}\n\ndata: [DONE]\n\n')


def test_the_gateways_error_event_is_not_relayed_but_taken_over() -> None:
    error = (
        b'data: {"error": {"message": "the answer broke off upstream", "code": "upstream_stream_broken"}}\n\n'
    )
    out, handed, breaks = _run(_event(_chunk("Hi", [1])) + error)
    assert len(handed) == 1 and b"upstream_stream_broken" not in out and "broke off upstream" in breaks[0]


def test_the_clouds_error_event_reaches_the_client_as_it_is_when_no_one_can_go_on() -> None:
    error = b'data: {"error": {"message": "the answer broke off upstream (reset); it is incomplete", '
    error += b'"type": "server_error", "code": "upstream_stream_broken"}}\n\n'
    out, handed, breaks = _run(_event(_chunk("Hi", [1])) + error, local_model=False)
    assert len(handed) == 1 and len(breaks) == 1
    assert out.endswith(error) and out.count(b"broke off upstream") == 1, out  # not wrapped twice
    cut, _, breaks = _run(_event(_chunk("Hi", [1])), fail=True, local_model=False)
    assert cut.endswith(b'it is incomplete", "type": "server_error", "code": "upstream_stream_broken"}}\n\n')
    assert "ClientPayloadError" in breaks[0]


def test_without_ids_the_text_is_handed_over_and_tool_calls_are_not_taken_over() -> None:
    _, handed, _ = _run(_event(_chunk("Hi")) + _event(_chunk(" there", [3])))
    assert handed[0].tokens is None and handed[0].resume().text == "Hi there"
    call = _chunk()
    call["choices"][0]["delta"]["tool_calls"] = [{"index": 0, "function": {"name": "f"}}]
    out, handed, _ = _run(_event(call))
    assert handed == [] and b"upstream_stream_broken" in out and not out.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_crlf_line_ends_and_an_end_marker_without_its_space_are_understood(size: int) -> None:
    """Servers may end lines with CRLF (split across two reads at any byte) and write
    ``data:[DONE]``; neither is a broken stream."""
    data = (_event(_chunk("Hel", [5])) + _event(_chunk("lo", [6], finish="stop"))).replace(b"\n", b"\r\n")
    out, handed, breaks = _run(data + b"data:[DONE]\r\n\r\n", size=size)
    assert handed == [] and breaks == [], breaks
    assert out.endswith(b"data: [DONE]\n\n") and b"\r" not in out
    relayed, broke = _relay(data + b"data:[DONE]\r\n\r\n", size)
    assert broke == [] and b"upstream_stream_broken" not in relayed
    error = b'data:{"error": {"message": "replica died"}}\r\n\r\n'
    relayed, broke = _relay(_event(_chunk("Hi")).replace(b"\n", b"\r\n") + error, size)
    assert broke == [] and relayed.endswith(b'"replica died"}}\n\n')


def _relay(data: bytes, size: int) -> tuple[bytes, list[str]]:
    breaks: list[str] = []

    async def go() -> bytes:
        out = b""
        async for part in relay_events(
            _pieces(data, size),
            errors=(aiohttp.ClientError,),
            on_break=lambda why, _failure: breaks.append(why),
        ):
            out += part
        return out

    return asyncio.run(go()), breaks


def test_a_stream_that_lost_only_its_end_marker_is_ended() -> None:
    out, handed, breaks = _run(_event(_chunk("Hi", [1], finish="stop")))
    assert handed == [] and len(breaks) == 1 and out.endswith(b"data: [DONE]\n\n")


def test_an_event_that_is_not_json_is_a_break_not_passed_on() -> None:
    """A garbled event would make the client's own parser fail before any error event said why."""
    for garbled in (b'data: {"choices": [\n\n', b"data: [1, 2]\n\n", b"data: nonsense\n\n"):
        out, handed, breaks = _run(_event(_chunk("Hi", [1])) + garbled + _event(_chunk("!", [2])))
        assert breaks == ["the cloud sent an event that is not a JSON object"], breaks
        assert handed[0].text == "Hi" and garbled not in out and b'"!"' not in out
        assert out.endswith(b'data: {"local": true}\n\ndata: [DONE]\n\n')
    # A comment (a keep-alive) is not data: passed on as it is.
    out, handed, breaks = _run(
        b": keep-alive\n\n" + _event(_chunk("Hi", [1], finish="stop")) + b"data: [DONE]\n\n"
    )
    assert handed == [] and breaks == [] and out.startswith(b": keep-alive\n\n")


def test_an_answer_of_several_choices_is_whole_only_when_every_choice_finished() -> None:
    first, second = _chunk("A", [1], finish="stop"), _chunk("B", [2])
    second["choices"][0]["index"] = 1
    out, handed, breaks = _run(_event(first) + _event(second), local_model=False)
    # Choice 1 was cut off: an error, not an end marker (and n > 1 is not continued locally).
    assert len(breaks) == 1 and handed == [] and b"upstream_stream_broken" in out
    assert not out.endswith(b"data: [DONE]\n\n")
    second["choices"][0]["finish_reason"] = "length"
    out, _, _ = _run(_event(first) + _event(second))
    assert out.endswith(b"data: [DONE]\n\n")
    # A choice whose index is not a number belongs to no answer that could be continued.
    odd = _chunk("?", [3])
    odd["choices"][0]["index"] = [1]
    out, handed, breaks = _run(_event(_chunk("Hi", [1])) + _event(odd), local_model=True)
    assert handed == [] and len(breaks) == 1 and b"upstream_stream_broken" in out


def test_return_token_ids_is_a_strict_chat_flag_and_refused_on_completions() -> None:
    import pytest
    from pydantic import ValidationError

    from shared.openai_api import ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**chat, "return_token_ids": "yes"})
    assert ChatCompletionRequest.model_validate({**chat, "return_token_ids": True}).wants_token_ids()
    assert not ChatCompletionRequest.model_validate(chat).wants_token_ids()
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "return_token_ids": True})
    assert completion.unsupported() == ["return_token_ids"]
