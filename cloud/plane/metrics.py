"""Prometheus metrics of one control-plane replica, read from live state at scrape time.

The gateway's figures are this replica's (each replica balances and rate-limits on its own);
the fleet's come from the shared database, so every replica reports the same device counts.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cloud.plane.service import ControlPlane

PREFIX = "autoglm_cloud"


class _PlaneCollector(Collector):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
        yield CounterMetricFamily(
            f"{PREFIX}_gateway_retries", "Requests sent again to another replica.", value=gw.retries
        )
        yield CounterMetricFamily(
            f"{PREFIX}_gateway_timeouts",
            "Requests answered 504: the replica did not answer within request_timeout_s.",
            value=gw.timeouts,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_gateway_rate_limited",
            "Requests refused with 429 by a tenant's rate limit.",
            value=self.plane.rate_limiter.refused,
        )
        devices = GaugeMetricFamily(
            f"{PREFIX}_devices", "Devices known to the fleet, by status.", labels=["tenant", "status"]
        )
        for tenant in self.plane.settings.tenants:
            counts = collections.Counter(d.status for d in self.plane.fleet.list_devices(tenant))
            for status in ("online", "offline", "unknown"):
                devices.add_metric([tenant, status], counts.get(status, 0))
        yield devices


def plane_registry(plane: ControlPlane) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PlaneCollector(plane))
    return registry
