"""The agent's data folder (edge_agent/datadir.py): one agent at a time, clear refusals for a
folder it cannot use, damaged databases set aside instead of a crash on every start."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.mqtt.local_broker import free_port
from edge_agent.batch.journal import BatchJournal
from edge_agent.datadir import DataDir
from edge_agent.uplink.outbox import Outbox
from shared.errors import ConfigError
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import EdgeProcess


def test_one_agent_holds_a_data_folder_at_a_time(tmp_path: Path) -> None:
    first = DataDir.claim(tmp_path / "data")
    with pytest.raises(ConfigError, match=f"in use by another agent \\(pid {os.getpid()}\\)"):
        DataDir.claim(tmp_path / "data")
    first.release()
    first.release()  # twice is harmless
    DataDir.claim(tmp_path / "data").release()


def test_a_data_folder_that_is_a_file_or_lies_under_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "data"):
        with pytest.raises(ConfigError, match="data_dir is not a folder"):
            DataDir.claim(path)


@pytest.mark.parametrize("damage", ["noise", "truncated"])
def test_a_damaged_database_is_set_aside_and_a_new_one_opened(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    outbox_path, journal_path = tmp_path / "outbox.sqlite3", tmp_path / "batches.sqlite3"
    if damage == "noise":
        for path in (outbox_path, journal_path):
            path.write_bytes(os.urandom(5000))
    else:
        outbox = Outbox(outbox_path)
        for _ in range(300):
            outbox.append_record("t", b"x" * 200)
        outbox.close()
        journal = BatchJournal(journal_path, retention_s=60)
        journal.close()
        for path in (outbox_path, journal_path):
            with sqlite3.connect(path) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            data = path.read_bytes()
            path.write_bytes(data[:100] + os.urandom(200) + data[300:4096])
    with caplog.at_level(logging.ERROR):
        outbox = Outbox(outbox_path)
        journal = BatchJournal(journal_path, retention_s=60)
    assert outbox.depth() == 0
    outbox.append_record("t", b"after")
    assert outbox.depth() == 1
    outbox.close()
    journal.close()
    assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*"))) == 1
    assert len(list(tmp_path.glob("batches.sqlite3.corrupt-*"))) == 1
    assert "telemetry outbox" in caplog.text and "batch journal" in caplog.text


def test_a_second_agent_on_the_folder_exits_with_one_line(
    tmp_path: Path, edge_factory: Callable[..., EdgeProcess]
) -> None:
    """Both ran before, sharing state and outbox, knocking each other off the broker."""
    key = SigningKey.generate().public.b64
    broker = BrokerSettings(port=free_port())  # none there: the agent serves without one
    first = edge_factory(device_id="held", tenant="t", broker=broker, trusted=[key])
    first.wait_http("/healthz")

    def second_agent(**env: str) -> subprocess.CompletedProcess[str]:
        """``edge run`` on the first agent's config, with ``env``'s overrides."""
        return subprocess.run(
            [sys.executable, "-m", "cloud.cli", "edge", "run", "--config", str(first.config)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=60,
        )

    second = second_agent(AUTOGLM_EDGE__API__PORT=str(free_port()))
    assert second.returncode == 2
    assert f"data_dir is in use by another agent (pid {first.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    # Another folder but the first's port: refused before its model and broker session start.
    port = first.api.rsplit(":", 1)[1]
    third = second_agent(AUTOGLM_EDGE__API__PORT=port, AUTOGLM_EDGE__DATA_DIR=str(tmp_path / "other"))
    assert third.returncode == 2, third.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in third.stderr
    assert "Traceback" not in third.stderr + third.stdout
    first.stop()
    # The first gone, the folder is free again.
    again = edge_factory(device_id="held", tenant="t", broker=broker, trusted=[key])
    again.wait_http("/healthz")
