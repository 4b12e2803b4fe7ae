"""The control plane's process wiring (cloud/plane/service.py), in process: what an operator sees when
its background loop dies. The loops themselves are exercised with real processes in
tests/test_control_plane.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud.plane.app import create_app
from cloud.plane.service import ControlPlane
from cloud.settings import CloudSettings
from tests.services import control_key_file


def test_a_dead_control_loop_is_logged_with_its_reason_and_fails_readiness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_driver(self: ControlPlane) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(ControlPlane, "drive_forever", broken_driver)
    settings = CloudSettings.model_validate(
        {
            "database_url": f"sqlite:///{tmp_path / 'cp.sqlite3'}",
            "registry_dir": str(tmp_path / "registries"),
            "broker": {"host": "127.0.0.1", "port": 9},  # nothing listens: the MQTT task just retries
            "control": {"key_file": str(control_key_file(tmp_path))},
        }
    )
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        for _ in range(50):
            if r.status_code == 503:
                break
            time.sleep(0.05)
            r = client.get("/readyz")
        assert r.status_code == 503
        assert "the database went away" in r.json()["reason"]
    stopped = [rec for rec in caplog.records if "the control loop stopped" in rec.getMessage()]
    assert stopped and "the database went away" in stopped[0].getMessage()
    assert stopped[0].exc_info is not None
