"""An instant OpenAI-compatible upstream for the overhead benchmarks: HTTP/1.1 keep-alive,
``GET …/models`` lists one model, ``POST …/chat/completions`` and ``POST …/completions`` answer
at once with a fixed body, or eight SSE chunks and ``[DONE]`` when the request streams. What a
benchmark then measures is the HTTP hops in front of it, not generation.

Run as ``python bench/upstream_stub.py PORT`` (the benchmarks start it as its own process).
"""

from __future__ import annotations

import asyncio
import json
import sys

MODEL = "stub"


def _chat_chunk(content: str | None, finish: str | None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


WORDS = ("one ", "two ", "three ", "four ", "five ", "six ", "seven ")
CHAT = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
CHAT_STREAM = b"".join(_chat_chunk(w, None) for w in WORDS) + _chat_chunk(None, "stop") + b"data: [DONE]\n\n"
COMPLETION = json.dumps(
    {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
MODELS = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}
).encode()


def _answer(head: bytes, body: bytes) -> tuple[bytes, bytes]:
    if head.startswith(b"GET"):
        return MODELS, b"application/json"
    chat = b"/chat/completions" in head.split(b"\r\n", 1)[0]
    if b'"stream":true' in body.replace(b" ", b""):
        return CHAT_STREAM, b"text/event-stream"
    return (CHAT if chat else COMPLETION), b"application/json"


async def serve(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                payload, kind = _answer(head, body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\n"
                    b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
