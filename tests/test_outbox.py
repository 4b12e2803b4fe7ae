"""The durable outbox and its sender, the pushed-config schema, fetch pacing and chat templates."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from edge_agent.runtime.chat import FALLBACK_STOP, ChatTemplate
from edge_agent.serving.config import ServingConfig
from edge_agent.settings import EdgeSettings
from edge_agent.update.fetcher import RateLimiter
from edge_agent.uplink.outbox import Outbox
from edge_agent.uplink.telemetry import OutboxSender, TelemetryRecorder
from shared.edge_config import EdgeConfig, RouterPolicy
from shared.errors import ContractError, RequestError
from shared.messages import TelemetryBatch
from shared.topics import Topics


def _recorder(outbox: Outbox) -> TelemetryRecorder:
    return TelemetryRecorder(outbox, Topics("t1"), "dev-1")


def _record(rec: TelemetryRecorder, n: int) -> list[str]:
    return [
        rec.record(model="m:1", served_by="local", prompt_tokens=3, completion_tokens=i, latency_ms=1.5)
        for i in range(n)
    ]


def test_entries_survive_a_reopen_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    ids = _record(_recorder(box), 5)
    box.append_message("autoglm/v1/t1/devices/dev-1/reported", b'{"r":1}', retain=True)
    box.close()  # a killed process commits nothing more; what is committed is there

    again = Outbox(path)
    assert again.depth() == 6
    entries = again.peek(10)
    assert [json.loads(e.payload)["id"] for e in entries[:5]] == ids
    assert entries[5].retain and not entries[5].record
    again.remove([e.seq for e in entries[:2]])
    assert again.depth() == 4 and again.delivered == 2


def test_oldest_records_are_dropped_beyond_the_cap_but_messages_stay(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=100)
    box.append_message("reported", b"{}", retain=True)
    ids = _record(_recorder(box), 150)
    assert box.depth() == 100
    assert box.dropped == 51
    entries = box.peek(200)
    assert not entries[0].record  # the reported state was kept
    assert json.loads(entries[-1].payload)["id"] == ids[-1]


def test_sender_batches_records_keeps_order_and_retries_unacknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    rec = _recorder(box)
    first = _record(rec, 5)
    box.append_message("reported-topic", b'{"state":1}', retain=True, uid="report-0001")
    second = _record(rec, 3)
    sent: list[tuple[str, bytes, bool]] = []
    failures = [True]  # the first publish is not acknowledged by the broker (the link broke)

    async def publish(topic: str, payload: bytes, retain: bool) -> bool:
        if failures:
            failures.pop()
            return False
        sent.append((topic, payload, retain))
        # The cloud stores it and acknowledges, end to end.
        if topic == "reported-topic":
            box.acknowledge(["report-0001"])
        else:
            box.acknowledge([r.id for r in TelemetryBatch.from_json(payload).records])
        return True

    async def run() -> None:
        connected = asyncio.Event()
        connected.set()
        sender = OutboxSender(box, "dev-1", publish, connected, batch_size=lambda: 4)
        task = asyncio.create_task(sender.run())
        async with asyncio.timeout(10):
            while box.depth():  # noqa: ASYNC110 (the outbox's SQLite file, not an event)
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    ids: list[str] = []
    for topic, payload, retain in sent:
        if topic == "reported-topic":
            assert retain and payload == b'{"state":1}'
            ids.append("REPORTED")
        else:
            batch = TelemetryBatch.from_json(payload)
            assert not retain and batch.device_id == "dev-1" and len(batch.records) <= 4
            ids.extend(r.id for r in batch.records)
    assert ids == [*first, "REPORTED", *second]
    assert box.delivered == 9


def test_entries_leave_only_on_the_clouds_acknowledgement_and_are_sent_again_without_one(
    tmp_path: Path,
) -> None:
    """The broker taking a message is not delivery: without the cloud's ack, entries are sent
    again after the timeout and on a new session; a reported state waits for the one before it."""
    box = Outbox(tmp_path / "o.sqlite3")
    rec = _recorder(box)
    ids = _record(rec, 3)
    box.append_message("reported-topic", b'{"state":1}', retain=True, uid="report-0001")
    box.append_message("reported-topic", b'{"state":2}', retain=True, uid="report-0002")
    published: list[bytes] = []
    sessions = [1]

    async def publish(topic: str, payload: bytes, retain: bool) -> bool:
        published.append(payload)
        return True  # the broker took it; the cloud never answers (until told below)

    async def run() -> None:
        connected = asyncio.Event()
        connected.set()
        sender = OutboxSender(
            box,
            "dev-1",
            publish,
            connected,
            batch_size=lambda: 10,
            sessions=lambda: sessions[0],
            ack_timeout_s=0.5,
        )
        task = asyncio.create_task(sender.run())
        await asyncio.sleep(0.3)
        # One batch and the first report went out; the second report waits for the first's ack.
        assert len(published) == 2 and b'{"state":1}' in published
        assert box.depth() == 5 and box.in_flight() == 4
        await asyncio.sleep(0.6)  # past the timeout: both sent again
        assert published.count(b'{"state":1}') == 2 and len(published) == 4
        box.acknowledge(["report-0001"])
        await asyncio.sleep(0.2)
        assert published[-1] == b'{"state":2}'
        sessions[0] += 1  # a reconnect: everything in flight goes again at once
        await asyncio.sleep(0.35)
        assert published.count(b'{"state":2}') == 2
        box.acknowledge([*ids, "report-0002"])
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert box.depth() == 0 and box.delivered == 5 and box.resent >= 4


def test_an_outbox_from_before_acknowledgements_is_migrated_and_drained(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, record INTEGER NOT NULL, retain INTEGER NOT NULL);"
        "INSERT INTO outbox (topic, payload, record, retain) VALUES ('reported', X'7b7d', 0, 1);"
    )
    db.commit()
    db.close()
    box = Outbox(path)
    [entry] = box.peek(10)
    assert entry.uid is None
    box.mark_sent([entry])  # no id to be acknowledged by: forgotten on the broker's ack, as before
    assert box.depth() == 0 and box.delivered == 1


def test_pushed_config_overlays_the_file_key_by_key(tmp_path: Path) -> None:
    settings = EdgeSettings.from_mapping(
        {
            "device_id": "d1",
            "data_dir": str(tmp_path),
            "trusted_keys": ["11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="],
            "control": {"trusted_keys": ["2w5ExjHcN8sMBtiPAr7Aq1v2YNZ8PIO0VxdUcRqyLvI="]},
            "runtime": {"threads": 2, "queue_size": 8},
            "sampling": {"temperature": 0.7},
        }
    )
    local = ServingConfig.resolve(settings.local_config())
    assert (local.threads, local.queue_size, local.temperature, local.top_p) == (2, 8, 0.7, 1.0)
    pushed = EdgeConfig.parse({"runtime": {"queue_size": 0}, "router": {"policy": "cloud_first"}})
    merged = ServingConfig.resolve(settings.local_config(), pushed)
    assert (merged.threads, merged.queue_size, merged.temperature) == (2, 0, 0.7)
    assert merged.router_policy == RouterPolicy.CLOUD_FIRST
    assert not merged.reload_needed(local)
    assert ServingConfig.resolve(EdgeConfig.parse({"runtime": {"threads": 1}})).reload_needed(local)


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"runtime": {"queue_size": -1}}, "runtime.queue_size"),
        ({"runtime": {"threads": "4"}}, "runtime.threads"),
        ({"sampling": {"top_p": 0}}, "sampling.top_p"),
        ({"router": {"policy": "anywhere"}}, "router.policy"),
        ({"router": {"cloud_url": "ftp://x"}}, "router.cloud_url"),
        ({"telemetry": {"batch_size": 5000}}, "telemetry.batch_size"),
        ({"unknown": {}}, "unknown"),
    ],
)
def test_invalid_pushed_config_names_the_key(config: dict[str, object], where: str) -> None:
    with pytest.raises(ContractError, match=where.replace(".", r"\.")):
        EdgeConfig.parse(config)


def test_rate_limiter_paces_to_the_cap() -> None:
    async def run() -> float:
        limiter = RateLimiter(1_000_000)
        start = time.perf_counter()
        for _ in range(5):
            await limiter.acquire(100_000)
        return time.perf_counter() - start

    # Five reservations of 0.1 s: the first goes at once, the fifth waits 0.4 s.
    assert 0.35 <= asyncio.run(run()) < 1.0


def test_chat_template_from_the_model_and_the_fallback(tmp_path: Path) -> None:
    fallback = ChatTemplate.from_folder(tmp_path)
    assert fallback.source == "fallback" and fallback.stop == FALLBACK_STOP
    text = fallback.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"

    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}})
    )
    model = ChatTemplate.from_folder(tmp_path)
    assert model.source == "model" and model.stop == ()
    assert model.render([{"role": "user", "content": "Hi"}]) == "<s>[user] Hi\n[assistant] "

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ raise_exception('only user turns') }}"})
    )
    with pytest.raises(RequestError, match="only user turns"):
        ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "Hi"}])


def test_sender_lets_records_linger_into_one_message(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    rec = _recorder(box)
    sent: list[bytes] = []

    async def publish(topic: str, payload: bytes, retain: bool) -> bool:
        sent.append(payload)
        box.acknowledge([r.id for r in TelemetryBatch.from_json(payload).records])
        return True

    async def run() -> None:
        connected = asyncio.Event()
        connected.set()
        sender = OutboxSender(box, "dev-1", publish, connected, batch_size=lambda: 100, linger_s=lambda: 0.3)
        task = asyncio.create_task(sender.run())
        for _ in range(5):  # one request every 20 ms, as a busy device makes them
            _record(rec, 1)
            await asyncio.sleep(0.02)
        async with asyncio.timeout(10):
            while box.depth():  # noqa: ASYNC110 (the outbox's SQLite file, not an event)
                await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert len(sent) == 1 and len(TelemetryBatch.from_json(sent[0]).records) == 5
