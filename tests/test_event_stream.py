"""``EventStream`` (edge_agent/serving/streaming.py): a streaming answer stops when its client
leaves, behind real uvicorn, and ends cleanly when it does not."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from cloud.mqtt.local_broker import free_port
from edge_agent.serving.streaming import EventStream


class _Source:
    """An endless event source that records how far it got and whether it was closed."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = threading.Event()

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                self.sent += 1
                yield f"data: {self.sent}\n\n".encode()
                await asyncio.sleep(0.01)
        finally:
            self.closed.set()


@pytest.fixture
def served() -> Iterator[tuple[str, list[_Source]]]:
    sources: list[_Source] = []
    app = FastAPI()

    @app.get("/endless")
    async def endless() -> EventStream:
        source = _Source()
        sources.append(source)
        return EventStream(source.events(), media_type="text/event-stream")

    @app.get("/short")
    async def short() -> EventStream:
        async def three() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return EventStream(three(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", sources
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_that_leaves_stops_the_stream(served: tuple[str, list[_Source]]) -> None:
    url, sources = served
    with httpx.Client() as client, client.stream("GET", f"{url}/endless") as r:
        lines = r.iter_lines()
        assert next(lines) == "data: 1"
    # The connection is closed: the source must be closed within moments, not run on.
    (source,) = sources
    assert source.closed.wait(5)
    sent = source.sent
    time.sleep(0.2)
    assert source.sent == sent


def test_a_stream_that_ends_is_whole_and_the_server_goes_on(served: tuple[str, list[_Source]]) -> None:
    url, _ = served
    with httpx.Client() as client:
        for _ in range(3):  # the watcher left nothing behind that would cancel the next request
            r = client.get(f"{url}/short")
            assert r.status_code == 200
            assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_the_watcher_cancels_only_for_a_disconnect() -> None:
    """Driven as raw ASGI: a disconnect ends the response quietly and leaves the task uncancelled."""

    async def main() -> None:
        source = _Source()
        sent: list[dict[str, object]] = []
        disconnect = asyncio.Event()

        async def receive() -> dict[str, object]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)
            if len(sent) == 3:
                disconnect.set()

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await EventStream(source.events())(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        assert source.closed.is_set() and sent[0]["type"] == "http.response.start"
        await asyncio.sleep(0)  # still runs: nothing pending would cancel it

    asyncio.run(main())


def test_on_close_runs_even_when_the_body_never_started() -> None:
    """A client gone before the first byte: the body generator never runs (so its ``finally``
    cannot release anything); ``on_close`` does."""

    async def main() -> None:
        closed: list[bool] = []
        source = _Source()

        async def receive() -> dict[str, object]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            raise OSError("the client is gone")

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        with pytest.raises(OSError, match="gone"):
            await EventStream(source.events(), on_close=lambda: closed.append(True))(scope, receive, send)
        assert closed == [True] and source.sent == 0

    asyncio.run(main())
