"""What storing device reports costs the control plane: CPU per report at several batch sizes.

The ingest thread (cloud/plane/ingest.py) stores whatever arrived while it wrote the last batch,
one transaction per batch (``Fleet.record``): in a 10,000-device rollout on a 2-vCPU VM half of
the reports came in batches of at most 50 and the median batch was one report, so both the cost
per report and the cost per batch count. A database (SQLite in a temporary folder, or
``--database-url``) gets ``--devices`` devices; then rounds of one report from each (the phase
alternating, so that every report also writes a history event, as an update's reports do) are
stored in batches of each ``--batch`` size. Per size: the process's CPU per report (median of
the rounds).

Usage: python bench/ingest_batches.py [--devices 10000] [--batch 1 --batch 10 --batch 500]
       [--database-url URL] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.plane.fleet import Fleet
from cloud.plane.store import make_engine, migrate
from shared.messages import DeviceStatus, ModelRef, Phase, ReportedState

TENANT = "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--batch", type=int, action="append", default=None, help="Reports per transaction.")
    ap.add_argument("--database-url", default=None, help="Default: SQLite in a temporary folder.")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds of one report per device, per size.")
    args = ap.parse_args()
    sizes = args.batch or [1, 10, 50, 500]
    url = args.database_url or f"sqlite:///{Path(tempfile.mkdtemp(prefix='autoglm-ingest-')) / 'cp.db'}"
    engine = make_engine(url)
    migrate(engine)
    fleet = Fleet(engine)
    model = ModelRef(name="m", version="1", manifest_digest="sha256:" + "1" * 64, manifest_size=100)
    ids = [f"sim-{i:05d}" for i in range(args.devices)]
    fleet.record([(TENANT, DeviceStatus(device_id=d, state="online")) for d in ids])
    revision = 0
    rows = []
    for size in sizes:
        per_report = []
        for _ in range(args.rounds):
            revision += 1
            phase = Phase.ACTIVE if revision % 2 else Phase.FETCHING
            reports = [
                (
                    TENANT,
                    ReportedState(
                        device_id=d,
                        revision=revision,
                        phase=phase,
                        active_slot="a",
                        slots={"a": model, "b": None},
                        report_id=f"r{revision:04d}-{d}",
                    ),
                )
                for d in ids
            ]
            started = time.process_time()
            for at in range(0, len(reports), size):
                fleet.record(reports[at : at + size])
            per_report.append((time.process_time() - started) / len(reports))
        rows.append((size, statistics.median(per_report), min(per_report), max(per_report)))
    print(f"machine: {platform.machine()}; python {platform.python_version()}; {engine.dialect.name}")
    print(f"{args.devices} devices, one report each per round, {args.rounds} rounds per batch size")
    print("| reports per transaction | CPU µs per report (min–max) |")
    print("|---:|---:|")
    for size, median, low, high in rows:
        print(f"| {size} | {median * 1e6:.1f} ({low * 1e6:.1f}–{high * 1e6:.1f}) |")


if __name__ == "__main__":
    main()
