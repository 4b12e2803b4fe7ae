"""The fleet's inference traffic as devices report it, for the control plane's ``/metrics``.

Agents serve their own ``/metrics`` on their node's 127.0.0.1 (their local API), which a cloud
Prometheus cannot reach (an edge node behind NAT, KubeEdge or not). What they served reaches the
cloud anyway, as telemetry records: counted here as each batch is stored, by tenant and by where
it was served (local, or the cloud fallback). Counts are this replica's (the broker shares the
devices' messages among replicas): ``sum`` them over replicas. A batch a device sent again after
a lost acknowledgement is counted again (the database keeps it once).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from shared.messages import TelemetryBatch

# Request latency buckets in seconds: a token from a warm cache up to a long generation.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Figures:
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))


class FleetTraffic:
    """Thread-safe: the ingest thread adds, the scrape reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by: dict[tuple[str, str], _Figures] = {}

    def observe(self, tenant: str, batch: TelemetryBatch) -> None:
        with self._lock:
            for r in batch.records:
                f = self._by.setdefault((tenant, r.served_by), _Figures())
                f.requests += 1
                f.errors += not r.ok
                f.completion_tokens += r.completion_tokens
                seconds = r.latency_ms / 1000
                f.latency_s += seconds
                f.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1

    def families(
        self, prefix: str, tenants: list[str]
    ) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The counts as metric families; every tenant's series exist from the start (at 0), so
        that a dashboard's queries find them before the first report."""
        with self._lock:
            for tenant in tenants:
                for served_by in ("local", "cloud"):
                    self._by.setdefault((tenant, served_by), _Figures())
            figures = {
                key: (f.requests, f.errors, f.completion_tokens, f.latency_s, list(f.buckets))
                for key, f in self._by.items()
            }
        labels = ["tenant", "served_by"]
        requests = CounterMetricFamily(
            f"{prefix}_fleet_requests",
            "Requests devices reported serving, by where they were served.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            f"{prefix}_fleet_request_errors", "Requests devices reported as failed.", labels=labels
        )
        tokens = CounterMetricFamily(
            f"{prefix}_fleet_completion_tokens", "Tokens devices reported generating.", labels=labels
        )
        latency = HistogramMetricFamily(
            f"{prefix}_fleet_request_seconds", "Request latency devices reported.", labels=labels
        )
        for key, (n, failed, generated, total_s, buckets) in sorted(figures.items()):
            requests.add_metric(list(key), n)
            errors.add_metric(list(key), failed)
            tokens.add_metric(list(key), generated)
            cumulative, running = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric(list(key), cumulative, total_s)
        yield from (requests, errors, tokens, latency)
