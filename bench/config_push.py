"""Recording a config pushed to the whole fleet: one transaction per device vs batched.

``POST /v1/config`` records a new desired state (the next revision, the new config, each
device's model kept) for every device its selector matches, then publishes them. This times the
recording alone, on a database of N devices (SQLite in a temporary folder, or
``--database-url``): ``Fleet.next_desired`` once per device, each in its own transaction (what the
push did before), against ``Fleet.next_config_many`` (500 devices per transaction, what it does
now). The per-device loop is timed on ``--sample`` devices and scaled to N.

Usage: python bench/config_push.py [--devices 10000] [--sample 2000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.plane.fleet import Fleet, Selector
from cloud.plane.store import make_engine, migrate
from shared.messages import DeviceStatus

TENANT = "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=2_000, help="Devices the one-by-one loop is timed on.")
    ap.add_argument("--database-url", help="Default: SQLite in a temporary folder (use a fresh database).")
    args = ap.parse_args()
    if args.devices < 1 or not 1 <= args.sample <= args.devices:
        raise SystemExit("--devices must be at least 1 and --sample between 1 and --devices")
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='autoglm-config-push-')}/cloud.db"
    engine = make_engine(url)
    migrate(engine)
    fleet = Fleet(engine)
    fleet.record([(TENANT, DeviceStatus(device_id=f"d{i:06d}", state="online")) for i in range(args.devices)])
    ids = fleet.matching(TENANT, Selector.parse(""))

    wall, cpu = time.perf_counter(), time.process_time()
    for device_id in ids[: args.sample]:
        fleet.next_desired(TENANT, device_id, keep_model=True, config={"runtime": {"threads": 1}})
    scale = args.devices / args.sample
    one_wall, one_cpu = (time.perf_counter() - wall) * scale, (time.process_time() - cpu) * scale

    wall, cpu = time.perf_counter(), time.process_time()
    records = fleet.next_config_many(TENANT, ids, {"runtime": {"threads": 2}})
    many_wall, many_cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(records) == args.devices
    engine.dispose()

    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}; python {platform.python_version()}")
    print(f"database: {engine.dialect.name}; {args.devices} devices")
    print(f"{'recording':<44}{'wall s':>10}{'CPU s':>10}")
    print(
        f"{'one transaction per device (next_desired)':<44}{one_wall:>10.2f}{one_cpu:>10.2f}"
        f"   (timed on {args.sample}, scaled)"
    )
    print(f"{'500 devices per transaction (next_config_many)':<44}{many_wall:>10.2f}{many_cpu:>10.2f}")


if __name__ == "__main__":
    main()
