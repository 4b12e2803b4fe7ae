"""Prometheus metrics of one edge agent: request counters updated as requests finish, and gauges
read from the live agent at scrape time (so they can never go stale)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.messages import Phase

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.routing.router import RequestRouter

PREFIX = "autoglm_edge"
# Label values for the endpoint; anything else counts as "other" so clients cannot grow the label set.
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/agent"})


class EdgeMetrics:
    def __init__(self, agent: EdgeAgent, router: RequestRouter) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "API requests answered, by endpoint, HTTP status and where they were served.",
            ["endpoint", "status", "served_by"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_seconds",
            "Time from request to last byte of the answer.",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(agent, router))


class RequestMetrics:
    """ASGI middleware: counts /v1 requests by status and served-by, timed to the last body byte
    (so a streamed answer counts its whole duration)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        served_by = "none"

        async def observe(message: Message) -> None:
            nonlocal status, served_by
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-autoglm-served-by":
                        served_by = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            metrics: EdgeMetrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                endpoint = path if path in ENDPOINTS else "other"
                metrics.requests.labels(endpoint, str(status), served_by).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class _LiveCollector(Collector):
    def __init__(self, agent: EdgeAgent, router: RequestRouter) -> None:
        self.agent = agent
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        a = self.agent
        stats = a.host.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield counter("prompt_tokens", "Prompt tokens processed locally.", stats.prompt_tokens)
        yield counter("completion_tokens", "Tokens generated locally.", stats.completion_tokens)
        yield counter("generation_seconds", "Seconds the local runtime spent generating.", stats.busy_s)
        yield counter(
            "rejected_queue_full",
            "Requests refused with 429 because the queue was full.",
            stats.rejected_queue_full,
        )
        yield gauge(
            "decode_tokens_per_second",
            "Decode rate of the last request with 2+ tokens.",
            stats.last_decode_tok_s,
        )
        yield gauge("queue_depth", "Requests waiting for the runtime.", a.host.waiting)
        yield gauge("generating", "Requests decoding now (parallel slots in use).", a.host.generating)
        yield gauge("parallel_slots", "Requests that may decode together.", a.host.width)
        yield gauge("queue_capacity", "Requests allowed to wait before 429.", a.host.queue_size)
        yield gauge("online", "1 while connected to the broker.", 1.0 if a.link.online else 0.0)
        yield gauge(
            "outbox_depth",
            "Cloud-bound entries the control plane has not acknowledged yet.",
            a.outbox.depth(),
        )
        yield counter(
            "outbox_delivered", "Outbox entries the control plane acknowledged as stored.", a.outbox.delivered
        )
        yield counter(
            "outbox_resent", "Outbox entries sent again for want of an acknowledgement.", a.outbox.resent
        )
        yield counter("dropped_messages", "Malformed inbound MQTT messages dropped.", a.link.dropped_messages)
        yield counter(
            "control_rejections",
            "Control messages refused (unsigned, forged, for another device, expired, replayed).",
            a.control_rejections,
        )
        yield counter("fetch_bytes", "Model bytes received.", a.fetcher.stats.bytes_received)
        yield counter(
            "cloud_fallbacks",
            "Requests the local side could not take, served by the cloud.",
            self.router.fallbacks,
        )
        yield counter(
            "cloud_streams_resumed",
            "Cloud chat streams that broke mid-answer and were finished by the local model.",
            self.router.cloud.streams_resumed,
        )
        yield counter(
            "cloud_overflows",
            "Local chat streams that filled the local context and were finished by the cloud.",
            self.router.overflows,
        )
        breaker = self.router.cloud.breaker
        yield gauge(
            "cloud_breaker_open",
            "1 while the cloud fallback's circuit is not closed (open, or half-open: cloud "
            "requests refused at once but for one probe).",
            1.0 if breaker.state != "closed" else 0.0,
        )

        current = a.host.current
        model = GaugeMetricFamily(
            f"{PREFIX}_active_model", "1 for the model being served.", labels=["model", "slot"]
        )
        if current is not None:
            model.add_metric([current.model_id, current.slot], 1.0)
        yield model

        state = a.reconciler.state
        phase = GaugeMetricFamily(
            f"{PREFIX}_update_phase", "1 for the reconciler's current phase.", labels=["phase"]
        )
        for p in Phase:
            phase.add_metric([p.value], 1.0 if state.phase == p else 0.0)
        yield phase
        yield gauge("applied_revision", "Last desired-state revision fully applied.", state.applied_revision)
