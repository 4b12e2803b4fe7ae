"""The rollout driver's own cost: the CPU of each tick of one rollout to N devices, no broker.

A database (SQLite in a temporary folder, or ``--database-url``) gets N devices that report a
model active; one rollout of another model to all of them in one wave (``max_concurrent`` N, no
health window), then the driver ticks while the devices' reports are stored the way the ingest
thread stores them: first none, then half of the devices report the target active, then the rest.
Per tick: the process's CPU time and the desired states it returned. What bench/rollout_scale.py
measures end to end (MQTT, signing, the ingest) is left out: this is the part that grows with the
number of devices on every tick, whatever the devices do.

Usage: python bench/rollout_ticks.py [--devices 10000] [--database-url URL] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.plane.fleet import Fleet
from cloud.plane.rollouts.actions import Rollouts
from cloud.plane.rollouts.driver import RolloutDriver
from cloud.plane.rollouts.spec import RolloutSpec
from cloud.plane.store import make_engine, migrate
from shared.messages import DeviceStatus, ModelRef, Phase, ReportedState

TENANT = "bench"


def model(version: str) -> ModelRef:
    return ModelRef(name="m", version=version, manifest_digest="sha256:" + version * 64, manifest_size=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--database-url", default=None, help="Default: SQLite in a temporary folder.")
    ap.add_argument("--repeat", type=int, default=3, help="Ticks in each state.")
    args = ap.parse_args()
    url = args.database_url or f"sqlite:///{Path(tempfile.mkdtemp(prefix='autoglm-ticks-')) / 'cp.db'}"
    engine = make_engine(url)
    migrate(engine)
    fleet = Fleet(engine)
    old, new = model("1"), model("2")
    n = args.devices
    ids = [f"sim-{i:05d}" for i in range(n)]
    fleet.record(
        [(TENANT, DeviceStatus(device_id=d, state="online")) for d in ids]
        + [
            (
                TENANT,
                ReportedState(
                    device_id=d, revision=0, phase=Phase.ACTIVE, active_slot="a", slots={"a": old, "b": None}
                ),
            )
            for d in ids
        ]
    )
    rollouts = Rollouts(engine, fleet)
    spec = RolloutSpec(model=new, waves=(100.0,), health_window_s=0, max_concurrent=n)
    rid = rollouts.create(TENANT, spec)["rollout_id"]
    driver = RolloutDriver(engine, fleet, "bench")
    rows: list[tuple[str, float, int]] = []

    def tick(label: str) -> list[str]:
        c0 = time.process_time()
        out = driver.tick()
        rows.append((label, time.process_time() - c0, len(out)))
        return [f"{r.device_id}:{r.revision}" for r in out]

    def report(devices: list[str]) -> None:
        fleet.record(
            [
                (
                    TENANT,
                    ReportedState(
                        device_id=d,
                        revision=int(rev),
                        phase=Phase.ACTIVE,
                        active_slot="b",
                        slots={"a": old, "b": new},
                    ),
                )
                for d, rev in (x.split(":") for x in devices)
            ]
        )

    sent = tick("first: a desired state for every device")
    for _ in range(args.repeat):
        tick("all updating, none reported since")
    report(sent[: n // 2])
    tick("half just reported the target active")
    for _ in range(args.repeat):
        tick("half active, half updating")
    report(sent[n // 2 :])
    tick("the rest just reported it active")
    tick("all active: healthy, wave completed")
    state = rollouts.show(TENANT, rid)["state"]

    print(f"machine: {platform.machine()}; python {platform.python_version()}; {engine.dialect.name}")
    print(f"{n} devices, one wave, no health window; rollout {state}")
    print(f"{'tick':<45}{'CPU ms':>9}{'ms per 1,000 devices':>22}{'publishes':>11}")
    for label, cpu, published in rows:
        print(f"{label:<45}{cpu * 1000:>9.1f}{cpu * 1e6 / n:>22.1f}{published:>11}")
    total = sum(cpu for _, cpu, _ in rows)
    print(f"{'all ticks':<45}{total * 1000:>9.1f}{total * 1e6 / n:>22.1f}")


if __name__ == "__main__":
    main()
