"""Parallel slots on the edge: requests decode together in batched steps (real ONNX Runtime on the
packaged demo model), each answering exactly as it does alone; admission, 429 and abandoned
requests keep their meaning."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from edge_agent.runtime.generator import GenerationParams, GenerationResult
from edge_agent.runtime.host import LoadedModel, ModelHost
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.text import Prompt
from edge_agent.update.slots import SlotStore
from shared.errors import ContextTooLong, QueueFull
from tests.services import until

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = (
    "import os\nimport sys\n",
    "def main():\n    ",
    "class Config:\n    def __init__(self",
    "for i in range(10):\n",
    "import os\nimport json\nfrom pathlib import Path\n\n\ndef load(path",
    "x = [",
)


@pytest.fixture(scope="module")
def folder(demo_package: RegistryEntry, registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    slots = SlotStore(tmp_path_factory.mktemp("slots"))
    return slots.stage("a", demo_package.manifest, demo_package.signed.to_json(), registry.blobs)


def _load(folder, demo_package: RegistryEntry) -> LoadedModel:  # type: ignore[no-untyped-def]
    return LoadedModel.load(folder, demo_package.manifest, "a", threads=1, providers=None)


@pytest.fixture(scope="module")
def alone(folder, demo_package: RegistryEntry) -> dict[tuple[str, int], GenerationResult]:  # type: ignore[no-untyped-def]
    """Each prompt's greedy answer decoded alone, for 8 to 40 new tokens."""
    model = _load(folder, demo_package)
    return {
        (p, n): model.generator.generate(Prompt(p), GenerationParams(max_tokens=n, sampling=GREEDY))
        for p in PROMPTS
        for n in (8, 24, 40)
    }


def _params(n: int) -> GenerationParams:
    return GenerationParams(max_tokens=n, sampling=GREEDY)


async def _collect(host: ModelHost, prompt: str, n: int, delay: float = 0.0) -> tuple[GenerationResult, int]:
    """Stream one request; its result and how many text pieces came."""
    await asyncio.sleep(delay)
    _, items = await host.stream(Prompt(prompt), _params(n))
    pieces = 0
    async for item in items:
        if isinstance(item, GenerationResult):
            return item, pieces
        pieces += 1
    raise AssertionError("no result")


def test_batched_answers_equal_the_answers_alone(folder, demo_package, alone) -> None:  # type: ignore[no-untyped-def]
    model = _load(folder, demo_package)
    assert model.generator.model.batches
    host = ModelHost(queue_size=16, parallel=4)
    host.swap(model)
    # Six requests for four slots, with different lengths: they finish at different steps and the
    # waiting ones take their rows, joining sequences that are decoding.
    lengths = (40, 8, 24, 40, 8, 24)

    async def go() -> list[tuple[GenerationResult, int]]:
        return await asyncio.gather(*(_collect(host, p, n) for p, n in zip(PROMPTS, lengths, strict=True)))

    results = asyncio.run(go())
    for (result, pieces), p, n in zip(results, PROMPTS, lengths, strict=True):
        want = alone[(p, n)]
        assert (result.text, result.completion_tokens, result.finish_reason) == (
            want.text,
            want.completion_tokens,
            want.finish_reason,
        ), p
        assert pieces > 0
    # The steps really were shared: more than one sequence decoded at once, on more than one row.
    buffers = model.generator.model._buffers
    assert buffers is not None and buffers.rows >= 3
    assert host.generating == 0 and host.waiting == 0 and host._admitted == 0
    # The prefix caches of the rows serve a later request that starts the same way (the first
    # prompt's row is the one no later request took).
    again = asyncio.run(_collect(host, PROMPTS[0] + "import re\n", 8))[0]
    assert again.cached_tokens >= len(model.generator.tokenizer.encode(PROMPTS[0]).ids) - 1


def test_apps_taking_turns_each_keep_their_prompt_cache(
    folder, demo_package, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Two apps with different long prompts, one request at a time: each request goes to a row
    of its own instead of overwriting the other app's cache (the lowest free row before), so every
    later request of either app reads only what follows its cached prefix; answers as alone. A
    request alone decodes in one-row steps on whichever row it holds (not beside idle rows)."""
    from edge_agent.runtime.session import _SharedBuffers

    spans: list[tuple[int, int]] = []
    original = _SharedBuffers.step_rows

    def spy(self, decoders, tokens, invariant=False):  # type: ignore[no-untyped-def]
        spans.append(self._span(decoders, invariant))
        return original(self, decoders, tokens, invariant)

    monkeypatch.setattr(_SharedBuffers, "step_rows", spy)
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=4, parallel=4)
    host.swap(model)
    apps = ("import os\nimport sys\nfrom pathlib import Path\n" * 6, "class Config:\n    x = [1, 2]\n" * 6)
    first = {a: asyncio.run(_collect(host, a + "def main():", 8))[0] for a in apps}
    assert all(r.cached_tokens <= 2 for r in first.values())  # a chat template's opening at most
    tokenizer = model.generator.tokenizer
    for a in apps:
        again = asyncio.run(_collect(host, a + "def other():", 8))[0]
        assert again.cached_tokens >= len(tokenizer.encode(a).ids) - 1, a
        assert again.text == model.generator.generate(Prompt(a + "def other():"), _params(8)).text
    buffers = model.generator.model._buffers
    assert buffers is not None and buffers.rows == 2
    assert {lo for lo, _ in spans} == {0, 1} and {width for _, width in spans} == {1}
    # Each span's step binding writes its logits into one array the buffers hold: with up to
    # rows x (rows + 1) / 2 spans, a vocabulary-wide array apiece would add up.
    assert len(buffers._steps) == 2 and buffers._step_logits is not None
    assert all(np.shares_memory(step.logits, buffers._step_logits) for step in buffers._steps.values())


def test_a_request_takes_the_row_that_serves_it_or_loses_least() -> None:
    """The choice of a KV row, on stand-in rows: the row that keeps most, if that is at least a
    quarter of what it overwrites; else an empty row, else a new one (when allowed), else the row
    that keeps most anyway, the least recently used on a tie."""
    from types import SimpleNamespace

    from edge_agent.runtime.session import _PrefixCache, _SharedBuffers

    def rows(*cached: tuple[list[int], int]) -> SimpleNamespace:
        caches = []
        for tokens, used in cached:
            cache = _PrefixCache()
            cache.tokens, cache.last_used = list(tokens), used
            caches.append(SimpleNamespace(cache=cache))
        return SimpleNamespace(rows=len(caches), by_row=caches)

    def choose(b: SimpleNamespace, prompt: list[int], busy: set[int] = frozenset(), grow: bool = False):  # type: ignore[no-untyped-def,assignment]
        return _SharedBuffers.choose_row(b, prompt, frozenset(busy), can_grow=grow)  # type: ignore[arg-type]

    other = [1, 2, *range(100, 140)]  # another app: shares a template's two opening tokens
    mine = [1, 2, *range(200, 230)]
    # The next turn of a conversation; the same system prompt after another question and answer
    # (keeps 10, overwrites 40: taken; 41: not).
    assert choose(rows((other, 1), (mine + [7] * 50, 2)), [*mine, 9]) == 1
    assert choose(rows((list(range(10)) + [5] * 40, 1), ([], 0)), list(range(10)) + [6] * 9) == 0
    assert choose(rows((list(range(10)) + [5] * 41, 1), ([], 0)), list(range(10)) + [6] * 9) == 1
    # A short question sharing a default system prompt with a long conversation: not taken.
    assert choose(rows(([*range(25), *range(300, 1300)], 1), ([], 0)), [*range(25), 7, 8, 9]) == 1
    # Two shared tokens of a 40-token cache: an empty row instead, else a new one.
    assert choose(rows((other, 1), ([], 0), ([], 0)), mine) == 1
    assert choose(rows((other, 1)), mine, grow=True) is None
    # Neither: the row sharing most, then the least recently used.
    assert choose(rows(([1, 2, 3, 4, *[9] * 40], 5), (other, 1)), [1, 2, 3, 4, 5, 6]) == 0
    assert choose(rows((other, 1), (other[:20], 2)), mine) == 0
    assert choose(rows((other, 5), (other, 2), (other, 9)), mine) == 1
    assert choose(rows((other, 5), (other, 2), (other, 9)), mine, busy={1}) == 0
    # Every row busy, or no prompt to match (the prefix cache off): as before.
    assert choose(rows((other, 1)), mine, busy={0}) is None
    assert choose(rows((other, 1), ([], 0)), []) == 0


def test_blocking_and_streaming_requests_share_steps(folder, demo_package, alone) -> None:  # type: ignore[no-untyped-def]
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=4, parallel=3)
    host.swap(model)

    async def go() -> list[GenerationResult]:
        blocking = [host.generate(Prompt(p), _params(24)) for p in PROMPTS[:2]]
        streamed = _collect(host, PROMPTS[2], 24)
        *done, (last, _) = await asyncio.gather(*blocking, streamed)
        return [r for _, r in done] + [last]

    for result, p in zip(asyncio.run(go()), PROMPTS[:3], strict=True):
        assert result.text == alone[(p, 24)].text


def test_full_queue_refuses_and_abandoned_requests_free_their_rows(folder, demo_package, alone) -> None:  # type: ignore[no-untyped-def]
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=1, parallel=2)
    host.swap(model)

    async def go() -> None:
        streams = [await host.stream(Prompt(p), _params(40)) for p in PROMPTS[:3]]  # 2 decoding, 1 waiting
        assert host.waiting == 1
        with pytest.raises(QueueFull) as refused:
            await host.stream(Prompt(PROMPTS[3]), _params(8))
        assert refused.value.retry_after_s >= 1
        # The first client goes away after one piece: its row goes to the one waiting.
        first = streams[0][1]
        await anext(first)
        await first.aclose()  # type: ignore[attr-defined]
        rest = []
        for _, items in streams[1:]:
            async for item in items:
                if isinstance(item, GenerationResult):
                    rest.append(item)
        assert [r.text for r in rest] == [alone[(p, 40)].text for p in PROMPTS[1:3]]
        for _ in range(100):
            if host._admitted == 0:
                break
            await asyncio.sleep(0.01)
        assert host._admitted == 0 and host.generating == 0
        # A cancelled blocking request leaves too (steps slowed down so that it is still decoding).
        lm = model.generator.model
        step = lm.step_together

        def slow(*args: object) -> object:
            time.sleep(0.01)
            return step(*args)  # type: ignore[arg-type]

        lm.step_together = slow  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(host.generate(Prompt(PROMPTS[0]), _params(40)))
        for _ in range(400):
            if host.generating:
                break
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if host.generating == 0:
                break
            await asyncio.sleep(0.01)
        assert host.generating == 0 and host._admitted == 0
        lm.step_together = step  # type: ignore[method-assign]
        result = await host.generate(Prompt(PROMPTS[5]), _params(8))
        assert result[1].text == alone[(PROMPTS[5], 8)].text

    asyncio.run(go())
    assert host.stats.rejected_queue_full == 1


def test_a_waiting_client_that_leaves_frees_its_place_while_the_rows_stay_busy(
    folder, demo_package, alone
) -> None:  # type: ignore[no-untyped-def]
    """A request still queued whose client goes away leaves the queue at the next step, not
    when a row frees for it: meanwhile its place went to nobody and newcomers got 429s."""
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=1, parallel=2)
    host.swap(model)
    lm = model.generator.model
    step = lm.step_together

    def slow(*args: object) -> object:
        time.sleep(0.01)  # 40 steps: the two rows stay busy for the whole test
        return step(*args)  # type: ignore[arg-type]

    lm.step_together = slow  # type: ignore[method-assign,assignment]

    async def go() -> None:
        streams = [await host.stream(Prompt(p), _params(40)) for p in PROMPTS[:2]]
        queued = asyncio.create_task(host.generate(Prompt(PROMPTS[2]), _params(8)))
        await until(lambda: host.waiting == 1, 5)
        with pytest.raises(QueueFull):
            await host.stream(Prompt(PROMPTS[3]), _params(8))
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await until(lambda: host.waiting == 0, 2)
        assert host.generating == 2  # both rows still decoding: the place was freed, not a row
        later = await host.stream(Prompt(PROMPTS[3]), _params(8))  # admitted now
        done = []
        for _, items in [*streams, later]:
            async for item in items:
                if isinstance(item, GenerationResult):
                    done.append(item.text)
        assert done == [alone[(p, 40)].text for p in PROMPTS[:2]] + [alone[(PROMPTS[3], 8)].text]

    try:
        asyncio.run(go())
    finally:
        lm.step_together = step  # type: ignore[method-assign]


def test_parallel_one_decodes_one_at_a_time(folder, demo_package, alone) -> None:  # type: ignore[no-untyped-def]
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=8, parallel=1)
    host.swap(model)

    async def go() -> list[tuple[GenerationResult, int]]:
        return await asyncio.gather(*(_collect(host, p, 8) for p in PROMPTS[:3]))

    results = asyncio.run(go())
    assert [r.text for r, _ in results] == [alone[(p, 8)].text for p in PROMPTS[:3]]
    buffers = model.generator.model._buffers
    assert buffers is not None and buffers.rows == 1


def test_long_prompts_are_read_in_pieces_between_decode_steps(
    folder, demo_package, alone, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Prompts longer than a piece are read a piece per step while the others decode; the
    answers are those of reading each prompt whole, alone."""
    import edge_agent.runtime.batcher as batcher_module
    import edge_agent.runtime.generator as generator_module

    monkeypatch.setattr(generator_module, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(batcher_module, "PREFILL_CHUNK", 5)
    model = _load(folder, demo_package)
    host = ModelHost(queue_size=8, parallel=4)
    host.swap(model)
    chosen = (PROMPTS[4], PROMPTS[1], PROMPTS[2], PROMPTS[0])  # 20+ tokens beside short ones
    assert len(model.generator.tokenizer.encode(PROMPTS[4]).ids) > 15

    async def go() -> list[tuple[GenerationResult, int]]:
        return await asyncio.gather(*(_collect(host, p, 24) for p in chosen))

    results = asyncio.run(go())
    assert [r.text for r, _ in results] == [alone[(p, 24)].text for p in chosen]
    # Alone, in pieces too: the same answer.
    piecewise = _load(folder, demo_package).generator.generate(Prompt(PROMPTS[4]), _params(24))
    assert piecewise.text == alone[(PROMPTS[4], 24)].text


def test_requests_that_arrive_together_decode_together_from_their_first_step(
    folder, demo_package, alone, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Short prompts waiting together are all read between two steps (up to a piece's worth of
    tokens), so the next step decodes them all, not one more per step; on the edge's kernels the
    three are read in one run, their prompts padded to the longest."""
    import threading

    from edge_agent.runtime.session import _SharedBuffers

    model = _load(folder, demo_package)
    widths: list[int] = []
    held = threading.Event()
    original = _SharedBuffers.step_rows
    prefill_rows = _SharedBuffers.prefill_rows
    read_together: list[tuple[list[int], bool]] = []  # (piece lengths, whether one run read them)

    def spy(self, decoders, tokens, invariant=False):  # type: ignore[no-untyped-def]
        widths.append(len(decoders))
        if len(widths) == 1:
            held.wait(30)  # the first request's first step waits while three more arrive
        return original(self, decoders, tokens, invariant)

    def spy_prefill(self, decoders, pieces):  # type: ignore[no-untyped-def]
        logits = prefill_rows(self, decoders, pieces)
        read_together.append(([len(p) for p in pieces], logits is not None))
        return logits

    monkeypatch.setattr(_SharedBuffers, "step_rows", spy)
    monkeypatch.setattr(_SharedBuffers, "prefill_rows", spy_prefill)
    host = ModelHost(queue_size=8, parallel=4)
    host.swap(model)

    async def go() -> list[tuple[GenerationResult, int]]:
        first = asyncio.create_task(_collect(host, PROMPTS[0], 24))
        await until(seconds=30.0, interval=0.001, condition=lambda: bool(widths))
        rest = [asyncio.create_task(_collect(host, p, 24)) for p in PROMPTS[1:4]]
        batcher = model.batcher
        assert batcher is not None
        await until(
            seconds=30.0, interval=0.001, condition=lambda: len(batcher._pending) == 3
        )  # submitted, not yet admitted
        held.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(go())
    assert widths[:2] == [1, 4]
    assert [r.text for r, _ in results] == [alone[(p, 24)].text for p in PROMPTS[:4]]
    lm = model.generator.model
    lengths = [len(model.generator.tokenizer.encode(p).ids) for p in PROMPTS[1:4]]
    assert len(set(lengths)) > 1  # padded: the shorter pieces end before the longest
    if lm.rows_independent and lm.trims_logits:  # in row order, which is the order tokenized
        assert [(sorted(sizes), one) for sizes, one in read_together] == [(sorted(lengths), True)]
    else:  # onnxruntime's kernels (a CPU without AVX2): one by one
        assert read_together == []


def test_requests_sent_together_start_together_and_a_lone_one_does_not_wait(
    folder, demo_package, alone, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A batcher starting from idle waits for the requests still being tokenized (up to
    ``gather_s``, here far longer than any test): four sent at once are read before the first
    step, which decodes all four. Nothing on its way, nothing to wait for: a lone request, or one
    sent beside a request that is refused while being tokenized, answers long before ``gather_s``."""
    from edge_agent.runtime.session import _SharedBuffers

    model = _load(folder, demo_package)
    widths: list[int] = []
    original = _SharedBuffers.step_rows

    def spy(self, decoders, tokens, invariant=False):  # type: ignore[no-untyped-def]
        widths.append(len(decoders))
        return original(self, decoders, tokens, invariant)

    monkeypatch.setattr(_SharedBuffers, "step_rows", spy)
    host = ModelHost(queue_size=8, parallel=4, gather_s=60.0)
    host.swap(model)

    async def together() -> list[tuple[GenerationResult, int]]:
        return await asyncio.gather(*(_collect(host, p, 24) for p in PROMPTS[:4]))

    results = asyncio.run(together())
    assert widths[0] == 4
    assert [r.text for r, _ in results] == [alone[(p, 24)].text for p in PROMPTS[:4]]

    began = time.monotonic()
    assert asyncio.run(_collect(host, PROMPTS[4], 8))[0].text == alone[(PROMPTS[4], 8)].text

    async def beside_a_refused_one() -> tuple[BaseException | tuple[GenerationResult, int], ...]:
        too_long = "word " * (model.generator.context_length * 2)
        return tuple(
            await asyncio.gather(
                _collect(host, too_long, 8), _collect(host, PROMPTS[5], 8), return_exceptions=True
            )
        )

    refused, answered = asyncio.run(beside_a_refused_one())
    assert isinstance(refused, ContextTooLong)
    assert isinstance(answered, tuple) and answered[0].text == alone[(PROMPTS[5], 8)].text

    # A request cancelled (its client gone) while its prompt is being tokenized is no longer
    # waited for.
    check = model.generator.check_prompt

    def slow_check(prompt, params):  # type: ignore[no-untyped-def]
        if prompt.text.startswith("slow "):
            time.sleep(2)
        return check(prompt, params)

    monkeypatch.setattr(model.generator, "check_prompt", slow_check)

    async def beside_a_cancelled_one() -> tuple[tuple[GenerationResult, int], float]:
        slow = asyncio.create_task(_collect(host, "slow " + PROMPTS[0], 8))
        answered = asyncio.create_task(_collect(host, PROMPTS[1], 8))
        await asyncio.sleep(0.3)
        slow.cancel()
        cancelled = time.monotonic()
        # Answered long before the cancelled prompt's tokenizing ends (2 s) or gather_s (60 s).
        return await answered, time.monotonic() - cancelled

    (result, _), after_cancel = asyncio.run(beside_a_cancelled_one())
    assert result.text == alone[(PROMPTS[1], 8)].text
    assert after_cancel < 1.5
    assert model.batcher is not None and model.batcher._arriving == 0
    assert time.monotonic() - began < 30


def test_newcomers_prompts_are_read_in_one_run_on_the_edge_kernels(
    folder, demo_package, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """On the edge's own kernels, requests that start together have their prompts read in one
    run over adjacent KV rows, the shorter ones padded: first on fresh rows, then on rows whose
    prefix caches hold different lengths of the new prompts. Every answer is the one the request
    gets alone on the same kernels. Rows that are not adjacent, or a padded piece that would not
    fit a row's buffer, are read one by one."""
    from edge_agent.runtime.kernels import library
    from edge_agent.runtime.session import _SharedBuffers

    lib = library()

    def load() -> LoadedModel:
        return LoadedModel.load(folder, demo_package.manifest, "a", threads=2, providers=None, custom_ops=lib)

    rounds = (
        (PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]),
        # The same four continued: each lands on the row caching its first turn.
        (
            PROMPTS[0] + "import re\n",
            PROMPTS[1] + "return 0\n",
            PROMPTS[2] + "):\n",
            PROMPTS[3] + "    pass\n",
        ),
    )
    reference = load()
    alone = {p: reference.generator.generate(Prompt(p), _params(16)).text for r in rounds for p in r}
    model = load()
    lm = model.generator.model
    assert lm.custom_ops_loaded == (lib is not None)
    runs: list[tuple[list[int], list[int], bool]] = []  # (cached positions, piece lengths, one run)
    prefill_rows = _SharedBuffers.prefill_rows

    def spy_prefill(self, decoders, pieces):  # type: ignore[no-untyped-def]
        cached = [d.past_len for d in decoders]
        logits = prefill_rows(self, decoders, pieces)
        runs.append((cached, [len(p) for p in pieces], logits is not None))
        return logits

    monkeypatch.setattr(_SharedBuffers, "prefill_rows", spy_prefill)
    host = ModelHost(queue_size=8, parallel=4, gather_s=60.0)  # the four start together
    host.swap(model)
    for prompts in rounds:

        async def go(prompts: tuple[str, ...] = prompts) -> list[tuple[GenerationResult, int]]:
            return await asyncio.gather(*(_collect(host, p, 16) for p in prompts))

        results = asyncio.run(go())
        assert [r.text for r, _ in results] == [alone[p] for p in prompts]
    if lib is None:  # no AVX2: onnxruntime's kernels read each prompt alone
        assert runs == []
        return
    assert [one_run for _, _, one_run in runs] == [True, True]
    (fresh, lengths, _), (cached, _, _) = runs
    assert fresh == [0, 0, 0, 0] and len(set(lengths)) > 1  # padded
    assert min(cached) > 0 and len(set(cached)) > 1  # each row continues its own cache
    buffers = lm._buffers
    assert buffers is not None
    # Bit for bit what each row computes reading its piece alone, fresh or after a cached prefix.
    rng = np.random.default_rng(3)
    prefixes = [rng.integers(3, 200, n).tolist() for n in (7, 0, 3)]
    pieces = [rng.integers(3, 200, n).tolist() for n in (5, 9, 2)]

    def started(row: int, prefix: list[int]):  # type: ignore[no-untyped-def]
        decoder = buffers.start(row)
        if prefix:
            decoder.step(prefix, last_only=True)
        return decoder

    together = lm.prefill_together([started(r, p) for r, p in enumerate(prefixes)], pieces)
    assert together is not None
    for r, (prefix, piece) in enumerate(zip(prefixes, pieces, strict=True)):
        assert np.array_equal(started(r, prefix).step(piece, last_only=True)[-1], together[r]), r
    # Given in another order than their rows': each answer in the order given.
    shuffled = lm.prefill_together(
        [started(r, prefixes[r]) for r in (2, 0, 1)], [pieces[r] for r in (2, 0, 1)]
    )
    assert shuffled is not None and np.array_equal(shuffled, together[[2, 0, 1]])
    # A one-token piece among longer ones: in the run, the logits it gets alone (a decode step:
    # the attention sums a prompt's rows and a step's alike).
    mixed = lm.prefill_together([started(0, prefixes[0]), started(1, prefixes[1])], [[5], [6, 7]])
    assert mixed is not None
    assert np.array_equal(started(0, prefixes[0]).step([5], last_only=True)[-1], mixed[0])
    # One by one: rows not adjacent, a padded piece past a row's buffer.
    assert lm.prefill_together([buffers.start(0), buffers.start(2)], [[5, 6], [7, 8]]) is None
    near_the_end = [buffers.start(0), buffers.start(1)]
    near_the_end[0].past_len = buffers.capacity - 2
    assert lm.prefill_together(near_the_end, [[5, 6], [6, 7, 8]]) is None


def test_batch_invariant_steps_have_even_widths(
    folder, demo_package, alone, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Batch-invariant mode: a lone request decodes beside an idle row and three beside a fourth,
    so every step is computed by the same (paired-row) kernels; answers match across company."""
    from edge_agent.runtime.session import _SharedBuffers

    model = _load(folder, demo_package)
    widths: list[int] = []
    original = _SharedBuffers.step_rows

    def spy(self, decoders, tokens, invariant=False):  # type: ignore[no-untyped-def]
        widths.append(self._span(decoders, invariant)[1])
        return original(self, decoders, tokens, invariant)

    monkeypatch.setattr(_SharedBuffers, "step_rows", spy)
    host = ModelHost(queue_size=8, parallel=3, batch_invariant=True)
    host.swap(model)
    lone = asyncio.run(_collect(host, PROMPTS[0], 24))[0]
    assert widths and set(widths) == {2}

    async def go() -> list[tuple[GenerationResult, int]]:
        return await asyncio.gather(*(_collect(host, p, 24) for p in PROMPTS[:3]))

    widths.clear()
    together = asyncio.run(go())
    assert 4 in widths and all(w % 2 == 0 for w in widths)
    assert together[0][0].text == lone.text
    assert [r.text for r, _ in together] == [alone[(p, 24)].text for p in PROMPTS[:3]]
