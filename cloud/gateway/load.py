"""What a pool replica says about its own load: the gauges of its Prometheus ``/metrics``.

The gateway's count of its own requests in flight is exact but blind to everyone else's: other
control-plane replicas balance on their own, and a replica may be reached directly. The
replica's gauges see all of them, a poll late. Two servers are understood:

=====================  ============================  ============================  ===========
server                 waiting                       running                       readiness
=====================  ============================  ============================  ===========
vLLM                   ``vllm:num_requests_waiting``  ``vllm:num_requests_running``  ``/health``
``autoglm pool serve``  ``autoglm_pool_queue_depth``   ``autoglm_pool_batch_size``    ``/readyz``
=====================  ============================  ============================  ===========

The families a replica exposes say which server it is, and so where its readiness is read.
Any other OpenAI-compatible server is balanced on the gateway's own count alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

ServerKind = Literal["vllm", "autoglm"]


@dataclass(frozen=True)
class LoadGauges:
    """Where one kind of server publishes its queue, its running batch and its readiness."""

    kind: ServerKind
    waiting: str
    running: str
    # At the server's root, beside /metrics; anything but 200 takes the replica out of rotation.
    ready_path: str


VLLM = LoadGauges("vllm", "vllm:num_requests_waiting", "vllm:num_requests_running", "/health")
AUTOGLM_POOL = LoadGauges("autoglm", "autoglm_pool_queue_depth", "autoglm_pool_batch_size", "/readyz")
KNOWN_SERVERS = (VLLM, AUTOGLM_POOL)


@dataclass(frozen=True)
class ReplicaLoad:
    """One scrape of a replica's gauges."""

    gauges: LoadGauges
    waiting: int
    running: int
    # The gateway's own requests in flight on the replica when the scrape was read: they are
    # already inside ``waiting + running`` and must not be counted twice.
    own_at_scrape: int = 0

    @property
    def others(self) -> int:
        """Requests on the replica that did not come from this gateway (never below zero: the
        gateway's count includes requests still on the wire, which the server has not seen)."""
        return max(0, self.waiting + self.running - self.own_at_scrape)


def server_root(base_url: str) -> str:
    """The server's root for ``base_url``, the OpenAI base the gateway posts to: vLLM and our pool
    serve ``/v1/...`` but ``/metrics``, ``/health`` and ``/readyz`` at the root."""
    parts = urlsplit(base_url.rstrip("/"))
    path = parts.path.removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_load(text: str, own_in_flight: int = 0) -> ReplicaLoad | None:
    """The load in a Prometheus text exposition; None when it carries no family of a known server.

    A plain scan for two families instead of a full exposition parser: vLLM's page is mostly
    histograms the gateway never reads, and this runs for every replica every poll. The samples
    of a family are summed (vLLM labels its gauges per engine and model).
    """
    for gauges in KNOWN_SERVERS:
        waiting = _family_sum(text, gauges.waiting)
        running = _family_sum(text, gauges.running)
        if waiting is not None and running is not None:
            return ReplicaLoad(gauges, round(waiting), round(running), own_in_flight)
    return None


def _family_sum(text: str, family: str) -> float | None:
    total: float | None = None
    start = 0
    while (at := text.find(family, start)) >= 0:
        start = at + len(family)
        if at and text[at - 1] != "\n":
            continue  # inside a comment (# HELP / # TYPE) or a longer name
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if not line or line[0] not in " {":
            continue  # another family whose name starts with this one
        # The value follows the labels (which may hold spaces) and may be followed by a timestamp.
        fields = line[line.rfind("}") + 1 :].split() if line[0] == "{" else line.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        total = (total or 0.0) + value
    return total
