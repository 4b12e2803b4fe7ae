"""GenerationChannel: items put from the model's thread reach the request's coroutine in order;
a decode step's items for several channels wake the event loop once."""

from __future__ import annotations

import asyncio
import threading

from edge_agent.runtime.channel import GenerationChannel, put_all
from edge_agent.runtime.generator import GenerationResult


def _result(text: str) -> GenerationResult:
    return GenerationResult(text=text, finish_reason="stop")


async def _read(channel: GenerationChannel) -> list[object]:
    return [item async for item in channel.items()]


def test_items_for_several_channels_arrive_in_order_with_one_wake_up() -> None:
    async def main() -> tuple[list[object], list[object], int]:
        loop = asyncio.get_running_loop()
        a, b = GenerationChannel(), GenerationChannel()
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def model_thread() -> None:
            put_all([(a, "a1"), (b, "b1"), (a, "a2")])  # one step's output
            put_all([(a, _result("A")), (b, _result("B"))])

        reading = asyncio.gather(_read(a), _read(b))
        thread = threading.Thread(target=model_thread)
        thread.start()
        got_a, got_b = await reading
        thread.join()
        return got_a, got_b, calls

    got_a, got_b, calls = asyncio.run(main())
    assert got_a[:2] == ["a1", "a2"] and isinstance(got_a[2], GenerationResult)
    assert got_b[:1] == ["b1"] and isinstance(got_b[1], GenerationResult)
    assert calls == 2


def test_a_closed_loop_cancels_the_channel() -> None:
    channels: list[GenerationChannel] = []

    async def make() -> None:
        channels.append(GenerationChannel())

    asyncio.run(make())  # the loop is closed when run() returns
    put_all([(channels[0], "late")])
    assert channels[0].cancelled.is_set()
