"""Prometheus metrics of one control-plane replica, read from live state at scrape time.

The gateway's figures are this replica's (each replica balances and rate-limits on its own);
the fleet's come from the shared database, so every replica reports the same device counts.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.messages import Phase

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from cloud.plane.service import ControlPlane

PREFIX = "autoglm_cloud"


def _kind(path: str) -> str:
    if path in ("/v1/chat/completions", "/v1/completions"):
        return "gateway"
    if path.startswith("/ui"):
        return "console"
    if path in ("/healthz", "/readyz", "/metrics"):
        return "probe"
    return "api"


class CountRequests:
    """ASGI middleware: HTTP requests this replica received, by kind (gateway, api, console,
    probe), into ``counts``: what the control plane's HPA scales on (request rate, through
    prometheus-adapter). Pure ASGI and a dict increment: nothing in the way of the gateway's
    streams."""

    def __init__(self, app: ASGIApp, counts: collections.Counter[str]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.counts[_kind(scope.get("path", ""))] += 1
        await self.app(scope, receive, send)


class _PlaneCollector(Collector):
    def __init__(self, plane: ControlPlane, requests: collections.Counter[str] | None) -> None:
        self.plane = plane
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        http = CounterMetricFamily(
            f"{PREFIX}_http_requests", "HTTP requests received, by kind.", labels=["kind"]
        )
        counts = self.requests if self.requests is not None else {}
        for kind in ("gateway", "api", "console", "probe"):
            http.add_metric([kind], counts.get(kind, 0))
        yield http
        gw = self.plane.gateway
        up = GaugeMetricFamily(
            f"{PREFIX}_gateway_replica_up", "1 while a pool replica is up.", labels=["replica"]
        )
        busy = GaugeMetricFamily(
            f"{PREFIX}_gateway_outstanding", "Requests in flight on a pool replica.", labels=["replica"]
        )
        served = CounterMetricFamily(
            f"{PREFIX}_gateway_served", "Requests a pool replica answered.", labels=["replica"]
        )
        for r in gw.replicas:
            up.add_metric([r.name], 1.0 if r.up else 0.0)
            busy.add_metric([r.name], r.outstanding)
            served.add_metric([r.name], r.served)
        yield from (up, busy, served)
        driver, ingest = self.plane.driver, self.plane.ingest
        counters = (
            ("gateway_retries", "Requests sent again to another replica.", gw.retries),
            (
                "gateway_timeouts",
                "Requests answered 504: the replica did not answer within request_timeout_s.",
                gw.timeouts,
            ),
            (
                "gateway_upstream_errors",
                "Requests answered 502: the replica's own server error or non-JSON answer (logged).",
                gw.upstream_errors,
            ),
            (
                "gateway_version_substitutions",
                "Device fallbacks for a version no replica had, answered by the nearest version.",
                gw.substitutions,
            ),
            (
                "gateway_rate_limited",
                "Requests refused with 429 by a tenant's rate limit.",
                self.plane.rate_limiter.refused,
            ),
            ("rollout_drives", "Rollout steps this replica's driver took.", driver.drives),
            (
                "rollout_drive_failures",
                "Rollout steps that failed (logged with the reason; retried on the next tick).",
                driver.failures,
            ),
            (
                "device_messages_stored",
                "Reports, status changes and telemetry batches written to the database.",
                ingest.stored,
            ),
            (
                "device_messages_failed",
                "Device messages the database refused (not acknowledged: the device sends them again).",
                ingest.failed,
            ),
            (
                "device_messages_refused_backlog",
                "Device messages dropped with their device's backlog full (not acknowledged: sent again).",
                ingest.refused,
            ),
            (
                "device_messages_malformed",
                "Device messages dropped as malformed (schema, size, JSON), over every tenant's link.",
                sum(link.dropped_messages for link in self.plane.links.values()),
            ),
            (
                "device_messages_impersonating",
                "Device messages dropped for naming another device than their topic (replies included).",
                sum(link.impersonations for link in self.plane.links.values()),
            ),
            (
                "acks_dropped",
                "Acknowledgements dropped with the backlog full (the devices send those entries again).",
                self.plane.acks_dropped,
            ),
        )
        for name, help_text, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            f"{PREFIX}_acks_pending",
            "Stored entries awaiting their acknowledgement.",
            value=self.plane.acks_pending,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_ingest_backlog", "Device messages waiting to be stored.", value=ingest.backlog
        )
        devices = GaugeMetricFamily(
            f"{PREFIX}_devices", "Devices known to the fleet, by status.", labels=["tenant", "status"]
        )
        phases = GaugeMetricFamily(
            f"{PREFIX}_devices_by_phase",
            "Devices by the update phase they last reported.",
            labels=["tenant", "phase"],
        )
        for tenant in self.plane.settings.tenants:
            counts = self.plane.fleet.status_counts(tenant)
            for status in ("online", "offline", "unknown"):
                devices.add_metric([tenant, status], counts.get(status, 0))
            reported = self.plane.fleet.phase_counts(tenant)
            for phase in Phase:
                phases.add_metric([tenant, phase.value], reported.get(phase.value, 0))
        yield devices
        yield phases
        yield from self.plane.traffic.families(PREFIX, self.plane.settings.tenants)


def plane_registry(
    plane: ControlPlane, requests: collections.Counter[str] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PlaneCollector(plane, requests))
    return registry
