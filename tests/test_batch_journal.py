"""The Batch API's logic in milliseconds: input-file checks, the journal's state machine and its
exactly-once results across a reopen, expiry and retention on a fake clock, the routing decisions,
the cloud gate's backoff, and the worker's lanes over a fake executor (the one narrow seam)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.batch.executor import Answer, answer, refusal
from edge_agent.batch.gate import CloudGate
from edge_agent.batch.idle import ActivityMeter, IdleSignal
from edge_agent.batch.input_file import parse_input_file
from edge_agent.batch.journal import BatchJournal, Item
from edge_agent.batch.policy import Lane, Verdict, after_local_refusal, lane_for_pending
from edge_agent.batch.states import ItemState
from edge_agent.batch.worker import BatchWorker
from edge_agent.settings import BatchSettings, EdgeSettings
from shared.batch_api import BatchInputLine, BatchOutputLine
from shared.edge_config import RouterPolicy
from shared.errors import (
    CloudUnavailable,
    ConfigError,
    Conflict,
    ContextTooLong,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
)
from tests.services import until

CHAT = "/v1/chat/completions"
DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _line(i: int, model: str = "demo-glm", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], **body},
    }


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def _lines(n: int) -> list[BatchInputLine]:
    return parse_input_file(_jsonl([_line(i) for i in range(n)]), CHAT, 100)


def _journal(path: Path, clock: Clock, retention_s: float = 30 * DAY) -> BatchJournal:
    return BatchJournal(path / "batches.sqlite3", retention_s=retention_s, clock=clock)


def _create(journal: BatchJournal, n: int, window_s: float = DAY) -> str:
    stored = journal.add_file("in.jsonl", "batch", _jsonl([_line(i) for i in range(n)]))
    record = journal.create_batch(
        endpoint=CHAT,
        input_file_id=stored.id,
        completion_window="24h",
        window_s=window_s,
        metadata={"job": "nightly"},
        lines=_lines(n),
    )
    return record.id


def _ok(item: Item, text: str = "hello", served_by: str = "local") -> BatchOutputLine:
    return answer(item, 200, {"object": "chat.completion", "text": text}, served_by).line


def _output(journal: BatchJournal, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in journal.content(file_id).decode().splitlines()]


# -- the input file ---------------------------------------------------------------------------------
BAD_FILES: list[tuple[bytes, str]] = [
    (
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}\n',
        "line 1: not valid JSON",
    ),
    (_jsonl([_line(0), [1, 2]]), "line 2: not a JSON object"),
    (_jsonl([{k: v for k, v in _line(0).items() if k != "custom_id"}]), "line 1: custom_id"),
    (_jsonl([_line(0), _line(1), _line(0)]), "line 3: custom_id 'req-0' is used by an earlier line"),
    (_jsonl([{**_line(0), "url": "/v1/completions"}]), "line 1: url '/v1/completions' is not the batch"),
    (_jsonl([{**_line(0), "url": "/v1/embeddings"}]), "line 1: url"),
    (_jsonl([{**_line(0), "method": "GET"}]), "line 1: method"),
    (_jsonl([_line(0), _line(1, max_tokens="10")]), "line 2: body.max_tokens"),
    (_jsonl([_line(0, stream=True)]), "line 1: body.stream: a batch request cannot stream"),
    (_jsonl([_line(0, suffix="}")]), "line 1: body.suffix"),
    (_jsonl([{**_line(0), "body": {"model": "m", "messages": []}}]), "line 1: body.messages"),
    (_jsonl([_line(0, max_tokens=5, max_completion_tokens=6)]), "line 1: body.max_completion_tokens"),
    (b"\n\n", "the input file has no requests"),
    (b"\xff\xfe{}", "not UTF-8"),
    (_jsonl([_line(i) for i in range(4)]), "line 4: the input file has more than 3 requests"),
    # A RecursionError, not a ValueError: it was a 500.
    (b'{"custom_id": "a", "body": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "line 1: JSON nested"),
    # Line numbers count "\n" alone: U+2028 before the bad line does not shift them.
    (_jsonl([_line(0, user="a\u2028b")]).replace(b"\\u2028", "\u2028".encode()) + b"{", "line 2: not valid"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_a_bad_input_file_is_refused_with_400_naming_the_line(content: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_input_file(content, CHAT, 3)
    assert refused.value.status == 400 and refused.value.param == "input_file_id"
    assert message in refused.value.message, refused.value.message


def test_a_good_input_file_keeps_its_order_and_skips_blank_lines() -> None:
    content = _jsonl([_line(0)]) + b"\n  \n" + _jsonl([_line(1, max_tokens=4)])
    lines = parse_input_file(content, CHAT, 10)
    assert [x.custom_id for x in lines] == ["req-0", "req-1"]
    assert lines[1].body["max_tokens"] == 4


def test_a_line_holding_raw_unicode_line_separators_is_one_request() -> None:
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings;
    str.splitlines cut such a line in two (400: "Unterminated string")."""
    odd = "one\u2028two\u2029three\x85four\x0cfive"
    content = "\r\n".join(
        json.dumps({**_line(i), "body": {**_line(i)["body"], "user": odd}}, ensure_ascii=False)
        for i in range(3)
    ).encode()
    lines = parse_input_file(content, CHAT, 10)
    assert [x.custom_id for x in lines] == ["req-0", "req-1", "req-2"]
    assert all(x.body["user"] == odd for x in lines)


def test_a_full_disk_is_a_507_naming_it_and_the_journal_carries_on(tmp_path: Path) -> None:
    """SQLite rolls back by itself on a full disk: the journal's own ROLLBACK then raised "no
    transaction is active" in place of the cause, and every write was a bare 500."""
    from shared.errors import StorageFull, http_error

    journal = _journal(tmp_path, Clock())
    batch_id = _create(journal, 3)
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk is about full
    with pytest.raises(StorageFull) as full:
        journal.add_file("big.jsonl", "batch", b"x" * 200_000)
    assert http_error(full.value).status == 507 and "full" in full.value.message
    assert not journal._db.in_transaction
    assert journal.batch(batch_id).total == 3  # what was stored is intact and readable
    journal._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert journal.add_file("big.jsonl", "batch", b"x" * 200_000).bytes == 200_000


# -- the journal ------------------------------------------------------------------------------------
def test_requests_move_by_the_table_and_a_result_is_written_once_even_across_a_reopen(tmp_path: Path) -> None:
    clock = Clock()
    journal = _journal(tmp_path, clock)
    batch_id = _create(journal, 3)
    pending = journal.next_items([ItemState.PENDING_LOCAL], 10)
    assert [i.index for i in pending] == [0, 1, 2]
    first, second, third = pending

    assert journal.move(second, ItemState.WAITING_CLOUD)
    assert not journal.move(second, ItemState.WAITING_CLOUD)  # no longer pending_local
    with pytest.raises(ValueError, match="cannot go"):
        journal.move(first, ItemState.DONE)  # results only through finish()
    assert journal.unfinished() == {"pending_local": 2, "waiting_cloud": 1}

    clock.now += 5
    assert journal.finish(first, _ok(first, "one"), served_by="local")
    journal.close()

    # A restart: the result is there, the unfinished requests too, and a second run of the
    # first request (it was in flight when the agent died) writes nothing.
    journal = _journal(tmp_path, clock)
    assert journal.item(batch_id, 0).state is ItemState.DONE
    assert not journal.finish(first, _ok(first, "one again"), served_by="local")
    waiting = journal.next_items([ItemState.WAITING_CLOUD], 10)
    assert [i.index for i in waiting] == [1]
    assert [i.index for i in journal.next_items([ItemState.PENDING_LOCAL], 10)] == [2]
    assert [i.index for i in journal.next_items([ItemState.PENDING_LOCAL, ItemState.WAITING_CLOUD], 10)] == [
        1,
        2,
    ]
    assert journal.next_items([ItemState.PENDING_LOCAL], 10, frozenset({(batch_id, 2)})) == []

    refused = refusal(third, ContextTooLong("prompt too long", param="messages"), "local")
    assert journal.finish(third, refused.line, served_by="local")
    assert journal.batch(batch_id).status == "in_progress"
    assert journal.finish(waiting[0], _ok(waiting[0], "from the cloud", "cloud"), served_by="cloud")

    done = journal.batch(batch_id)
    assert done.status == "completed" and (done.total, done.completed, done.failed) == (3, 2, 1)
    assert done.completed_at == done.finalizing_at == clock.now
    wire = done.wire()
    assert wire.request_counts.completed == 2 and wire.metadata == {"job": "nightly"}
    output = _output(journal, done.output_file_id)
    assert [(x["custom_id"], x["response"]["body"]["text"]) for x in output] == [
        ("req-0", "one"),
        ("req-1", "from the cloud"),
    ]
    assert output[1]["response"]["served_by"] == "cloud" and output[0]["error"] is None
    errors = _output(journal, done.error_file_id)
    assert [x["custom_id"] for x in errors] == ["req-2"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert journal.file(done.output_file_id or "").purpose == "batch_output"
    # Final: nothing more may be written, and the batch is no longer handed out.
    assert not journal.finish(third, _ok(third), served_by="local")
    assert journal.next_items([ItemState.PENDING_LOCAL, ItemState.WAITING_CLOUD], 10) == []
    with pytest.raises(Conflict):
        journal.cancel(batch_id)


def test_a_batch_past_its_window_expires_and_results_and_batches_go_after_the_retention(
    tmp_path: Path,
) -> None:
    clock = Clock()
    journal = _journal(tmp_path, clock, retention_s=7 * DAY)
    batch_id = _create(journal, 3, window_s=DAY)
    first = journal.next_items([ItemState.PENDING_LOCAL], 1)[0]
    journal.finish(first, _ok(first), served_by="local")

    clock.now += DAY - 1
    assert journal.expire() == []
    clock.now += 2
    assert journal.expire() == [batch_id]
    expired = journal.batch(batch_id)
    assert expired.status == "expired" and expired.expired_at == clock.now
    assert (expired.completed, expired.failed) == (1, 2)
    errors = _output(journal, expired.error_file_id)
    assert [(x["custom_id"], x["error"]["code"], x["response"]) for x in errors] == [
        ("req-1", "batch_expired", None),
        ("req-2", "batch_expired", None),
    ]
    assert len(_output(journal, expired.output_file_id)) == 1

    files, _ = journal.files()
    assert len(files) == 3  # the input, the output and the error file
    clock.now += 6 * DAY
    assert journal.sweep() == (1, 0)  # the input file was uploaded a day earlier
    clock.now += DAY
    assert journal.sweep() == (2, 1)
    assert journal.files() == ([], False)
    assert journal.batches() == ([], False)


def test_cancel_fails_what_did_not_run_and_lists_page_newest_first(tmp_path: Path) -> None:
    clock = Clock()
    journal = _journal(tmp_path, clock)
    ids = []
    for _ in range(3):
        ids.append(_create(journal, 2))
        clock.now += 1
    cancelled = journal.cancel(ids[0])
    assert cancelled.status == "cancelled" and cancelled.cancelling_at == cancelled.cancelled_at
    assert cancelled.output_file_id is None and cancelled.failed == 2
    assert {x["error"]["code"] for x in _output(journal, cancelled.error_file_id)} == {"batch_cancelled"}
    with pytest.raises(Conflict):
        journal.cancel(ids[0])

    page, more = journal.batches(limit=2)
    assert [b.id for b in page] == [ids[2], ids[1]] and more
    page, more = journal.batches(limit=2, after=ids[1])
    assert [b.id for b in page] == [ids[0]] and not more
    inputs, _ = journal.files(purpose="batch")
    assert len(inputs) == 3
    journal.delete_file(inputs[0].id)
    assert len(journal.files(purpose="batch")[0]) == 2


# -- decisions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "local_model", "cloud_configured", "cloud_failing", "lane"),
    [
        (RouterPolicy.LOCAL_FIRST, True, True, False, Lane.LOCAL),
        (RouterPolicy.LOCAL_FIRST, False, True, False, Lane.CLOUD),
        (RouterPolicy.LOCAL_FIRST, False, False, False, None),
        (RouterPolicy.LOCAL_ONLY, True, True, False, Lane.LOCAL),
        (RouterPolicy.LOCAL_ONLY, False, True, False, None),
        (RouterPolicy.CLOUD_ONLY, True, True, True, Lane.CLOUD),
        (RouterPolicy.CLOUD_FIRST, True, True, False, Lane.CLOUD),
        (RouterPolicy.CLOUD_FIRST, True, True, True, Lane.LOCAL),
        (RouterPolicy.CLOUD_FIRST, True, False, False, Lane.LOCAL),
    ],
)
def test_which_lane_takes_pending_requests(
    policy: RouterPolicy, local_model: bool, cloud_configured: bool, cloud_failing: bool, lane: Lane | None
) -> None:
    found = lane_for_pending(
        policy, local_model=local_model, cloud_configured=cloud_configured, cloud_failing=cloud_failing
    )
    assert found is lane


@pytest.mark.parametrize(
    ("error", "policy", "cloud", "verdict"),
    [
        (ModelNotFound("only in the cloud"), RouterPolicy.LOCAL_FIRST, True, Verdict.CLOUD),
        (ContextTooLong("too long"), RouterPolicy.LOCAL_FIRST, True, Verdict.CLOUD),
        (ContextTooLong("too long"), RouterPolicy.LOCAL_FIRST, False, Verdict.FAIL),
        (ModelNotFound("only in the cloud"), RouterPolicy.LOCAL_ONLY, True, Verdict.FAIL),
        (InvalidRequest("bad stop"), RouterPolicy.LOCAL_FIRST, True, Verdict.FAIL),
        (QueueFull("busy"), RouterPolicy.LOCAL_FIRST, True, Verdict.RETRY),
        (ModelNotReady("loading"), RouterPolicy.LOCAL_ONLY, False, Verdict.RETRY),
    ],
)
def test_what_becomes_of_a_local_refusal(
    error: Any, policy: RouterPolicy, cloud: bool, verdict: Verdict
) -> None:
    assert after_local_refusal(error, policy, cloud_configured=cloud) is verdict


def test_the_cloud_gate_backs_off_with_jitter_and_opens_on_success_or_a_reconnect() -> None:
    clock = Clock(0.0)
    gate = CloudGate(1.0, 8.0, clock=clock, jitter=False)
    assert gate.ready() and not gate.failing
    assert [gate.failure() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert gate.failing and gate.wait_s() == 8.0
    clock.now += 3
    assert gate.wait_s() == 5.0
    gate.retry_now()
    assert gate.ready() and gate.failing
    assert gate.failure(at_least_s=12.0) == 12.0
    gate.success()
    assert gate.ready() and not gate.failing and gate.failure() == 1.0
    jittered = CloudGate(2.0, 60.0, clock=clock)
    assert 1.0 <= jittered.failure() <= 3.0


def test_the_device_is_idle_only_when_no_interactive_request_ran_lately() -> None:
    clock = Clock(100.0)
    meter = ActivityMeter(clock)
    waiting = [0]
    idle = IdleSignal(meter, lambda: waiting[0], idle_s=1.0)
    assert idle.idle()
    meter.started()
    assert not idle.idle()
    meter.ended()
    assert not idle.idle() and idle.wait_s() == 1.0
    clock.now += 1.0
    assert idle.idle()
    waiting[0] = 1
    assert not idle.idle()


def test_batch_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    assert BatchSettings().max_lines == 50_000
    with pytest.raises(ConfigError, match="cloud_retry_max_s"):
        EdgeSettings.from_mapping(
            {
                "device_id": "d",
                "data_dir": str(tmp_path),
                "trusted_keys": [],
                "control": {"trusted_keys": []},
                "batch": {"cloud_retry_initial_s": 10, "cloud_retry_max_s": 1},
            }
        )


# -- the worker, over a fake executor ------------------------------------------------------------------
class FakeExecutor:
    """Serves requests whose model is "demo-glm" locally; the rest only "the cloud" can, and only
    while ``cloud_up``."""

    def __init__(self) -> None:
        self.cloud_up = False
        self.calls: list[tuple[str, str]] = []

    def cloud_configured(self) -> bool:
        return True

    def cloud_retry_in(self) -> float:
        return 0.0

    async def run_local(self, item: Item) -> Answer:
        self.calls.append(("local", item.custom_id))
        await asyncio.sleep(0)
        if item.body["model"] != "demo-glm":
            raise ModelNotFound("not served here", param="model")
        return answer(item, 200, {"model": "demo-glm"}, "local")

    async def run_cloud(self, item: Item) -> Answer:
        self.calls.append(("cloud", item.custom_id))
        if not self.cloud_up:
            raise CloudUnavailable("the cloud fallback failed: connection refused")
        return answer(item, 200, {"model": item.body["model"]}, "cloud")


def test_the_worker_serves_locally_while_cloud_requests_wait_and_then_go_to_the_cloud(tmp_path: Path) -> None:
    journal = BatchJournal(tmp_path / "b.sqlite3", retention_s=DAY)
    lines = [_line(i, "demo-glm" if i % 2 == 0 else "cloud-glm") for i in range(6)]
    stored = journal.add_file("in.jsonl", "batch", _jsonl(lines))
    batch_id = journal.create_batch(
        endpoint=CHAT,
        input_file_id=stored.id,
        completion_window="24h",
        window_s=DAY,
        metadata=None,
        lines=parse_input_file(_jsonl(lines), CHAT, 10),
    ).id
    executor = FakeExecutor()
    online = [False]
    worker = BatchWorker(
        journal,
        executor,  # type: ignore[arg-type]
        policy=lambda: RouterPolicy.LOCAL_FIRST,
        local_model=lambda: True,
        idle=IdleSignal(ActivityMeter(), lambda: 0, idle_s=0.0),
        online=lambda: online[0],
        settings=BatchSettings(cloud_retry_initial_s=30, cloud_retry_max_s=60),
    )

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(10):
                await until(lambda: journal.batch(batch_id).completed == 3)
                await asyncio.sleep(0.05)
                assert journal.unfinished() == {"pending_local": 0, "waiting_cloud": 3}
                assert worker.gate.failing  # and backing off for 30 s: nothing moves by itself
                # The cloud comes back and so does the MQTT link: the worker tries at once.
                executor.cloud_up = True
                online[0] = True
                await until(lambda: journal.batch(batch_id).status == "completed")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    done = journal.batch(batch_id)
    output = _output(journal, done.output_file_id)
    assert [x["custom_id"] for x in output] == [f"req-{i}" for i in range(6)]
    assert [x["response"]["served_by"] for x in output] == ["local", "cloud"] * 3
    assert worker.served == {"local": 3, "cloud": 3}
    # Each local request ran once; the cloud was probed one request at a time while it was down.
    assert sorted(c for w, c in executor.calls if w == "local") == [f"req-{i}" for i in range(6)]
    assert done.error_file_id is None
