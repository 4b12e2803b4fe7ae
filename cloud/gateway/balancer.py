"""The fallback gateway: OpenAI requests from tenants' inference keys, spread over the pool replicas.

* Balancing: the least loaded among the replicas that are up and list the requested ``model``
  (replicas whose list is not known yet are tried after those that list it). A replica's load is
  the gateway's own requests in flight on it (exact, live) plus the requests its ``/metrics``
  showed beyond those at the last scrape (other control-plane replicas' and direct clients',
  ``cloud.gateway.load``): vLLM's waiting and running requests, our pool's queue and batch. A
  replica that answers 404 does not serve that model: the request goes to another, and the
  client gets the 404 only when none serves it (a 503 when a replica that lists the model is
  down: it is served here, not now).
* Health: every replica's ``GET {url}/models`` is polled (which also learns its models), and the
  readiness of the servers the gateway recognises by their metrics (vLLM's ``/health``, our
  pool's ``/readyz``); a replica that refuses a connection or drops one mid-answer is marked down
  at once and comes back when a poll succeeds.
* Retries: a request whose replica failed before an answer reached the client (connection refused
  or reset, the answer cut off, 502/503/504) is sent to another replica, up to ``max_attempts``.
  Completions have no side effects, so sending one again is safe. A stream that breaks after its
  first bytes reached the client cannot be retried: it ends with an OpenAI-style error event (no
  ``[DONE]``), the replica is marked down and the break counted (one that falls silent past
  ``request_timeout_s`` mid-answer ends the same way but stays up: busy, as below).
* A replica's own error: a 5xx that is not an OpenAI error envelope (``{"error": {...}}``, which
  an OpenAI-compatible server writes for clients and which passes as it is), or a 2xx that is
  not JSON, is answered 502 ``upstream_error``; what it said goes to the log, not to the client
  (plain text from a crashed server can name its internals). Not retried: the same request may
  fail the same way on another replica.
* Timeouts: a replica that accepted a request but has not answered within ``request_timeout_s``
  is busy, not down: the client gets 504 and the replica stays in rotation. Sending the same long
  generation to another replica would only double the work (and time out there too).
* Versions: a replica that serves a registry version lists it as ``name:version`` beside
  ``name`` (``autoglm pool serve --from-registry``; vLLM with ``--served-model-name name
  name:version``), so a request for ``name:version`` goes only to replicas that have that version.
  When none has it and the request allows it (``X-AutoGLM-Version-Fallback: closest``, which edge
  fallbacks send), the nearest version of the name is asked instead: the highest below the one
  asked for, else the lowest above (versions compare as numbers where they are numbers), else
  the bare name where replicas serve it without a version. Every
  successful answer names the model id it was made by in ``X-AutoGLM-Model`` (for a bare name,
  the replica's one ``name:version`` when it lists one; left out for an id no header can carry,
  which a replica that answers any name may be asked for).
* Discovery: an upstream with ``discover`` is a name whose every address is a replica (a
  Kubernetes headless Service: one per pod), named ``NAME@ADDRESS``; the name is looked up again
  before every health poll, replicas of addresses that came keep their counts, those of addresses
  gone leave (requests in flight on them finish). A lookup that fails keeps the replicas known.
* Any OpenAI-compatible server can be a replica: only ``/models``, ``/completions`` and
  ``/chat/completions`` under its base URL are needed; ``/metrics`` and readiness are used where
  the server has them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from fastapi import Response

from cloud.gateway.load import LoadGauges, ReplicaLoad, parse_load, server_root
from cloud.gateway.upstream import Origin, UpstreamBroken, UpstreamClient, UpstreamResponse, UpstreamSlow
from cloud.settings import GatewaySettings, UpstreamSettings
from edge_agent.serving.service import cloud_answer_headers
from edge_agent.serving.sse import relay_events
from edge_agent.serving.streaming import EventStream
from shared.errors import NoPool, PoolUnavailable, UpstreamError, UpstreamTimeout
from shared.openai_api import DEFAULT_MODEL, MODEL_HEADER, ModelCard, ModelList

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-AutoGLM-Replica"
_RETRY_STATUS = frozenset({502, 503, 504})
# The replica took the request and is slow to answer (connect timeouts are failures: retried).
_GENERATION_TIMEOUTS = (UpstreamSlow,)
# A replica that could not be reached or dropped the connection.
_TRANSPORT_ERRORS = (UpstreamBroken,)


@dataclass
class Replica:
    name: str
    url: str
    api_key: str | None
    # Requests this gateway has in flight on the replica.
    outstanding: int = 0
    up: bool = True
    served: int = 0
    failures: int = 0
    last_error: str | None = None
    # The model ids its last /models answer listed (None: not known yet).
    models: frozenset[str] | None = None
    # Which server its metrics showed it to be (None: not one the gateway knows). Kept while a
    # scrape fails, so that a replica that went down is still judged by its readiness when it
    # answers /models again.
    server: LoadGauges | None = None
    # The last scrape of its gauges (None: none, or the last scrape failed).
    load: ReplicaLoad | None = None

    @property
    def root(self) -> str:
        return server_root(self.url)

    @property
    def estimated_load(self) -> int:
        """Requests on the replica now, as well as the gateway can tell: its own, counted live,
        and the others the last scrape saw (a poll old, but nothing fresher exists)."""
        return self.outstanding + (self.load.others if self.load is not None else 0)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def post_headers(self) -> dict[str, str]:
        return {**self.headers(), "content-type": "application/json"}

    def served_as(self, model: object) -> str | None:
        """The id the replica answers ``model`` with, most precise first: for a bare name, the
        one "name:version" it lists, if it lists exactly one; for "default" (the replica's own
        choice), its one "name:version", else its one model (None when it lists several: which
        one answered is not known)."""
        if not isinstance(model, str):
            return None
        if model == DEFAULT_MODEL and model not in (self.models or ()):
            if self.models is None:
                return None
            versions = [m for m in self.models if ":" in m]
            only = versions if versions else list(self.models)
            return only[0] if len(only) == 1 else None
        if ":" not in model and self.models is not None:
            versions = [m for m in self.models if m.partition(":")[0] == model and ":" in m]
            if len(versions) == 1:
                return versions[0]
        return model

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "up": self.up,
            "outstanding": self.outstanding,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
            "models": sorted(self.models) if self.models is not None else None,
            "server": self.server.kind if self.server is not None else None,
            "waiting": self.load.waiting if self.load is not None else None,
            "running": self.load.running if self.load is not None else None,
            "load": self.estimated_load,
        }


class _ReplicaFailed(Exception):
    """This replica could not answer; another may."""


class _NotServedHere(Exception):
    """This replica answered 404 (it does not serve the model); another may."""

    def __init__(self, response: Response) -> None:
        super().__init__("HTTP 404")
        self.response = response


def _model_ids(body: Any) -> frozenset[str] | None:
    """The ids of an OpenAI model list; None when the answer is not one."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return frozenset(c["id"] for c in data if isinstance(c, dict) and isinstance(c.get("id"), str))


class PoolGateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        named = list(zip(settings.replica_names(), settings.upstreams, strict=True))
        self._fixed = [Replica(name, u.url.rstrip("/"), u.api_key) for name, u in named if not u.discover]
        # Each discovered upstream's replicas by address, as its last lookup found them.
        self._discovered: dict[str, tuple[UpstreamSettings, dict[str, Replica]]] = {
            name: (u, {}) for name, u in named if u.discover
        }
        self.replicas = list(self._fixed)
        self.retries = 0
        self.timeouts = 0
        self.upstream_errors = 0  # replicas' own 5xx and non-JSON answers (not passed on)
        # Requests for a version no replica had, answered by the nearest one.
        self.substitutions = 0
        # Streams that broke off after the client had its first bytes (ended with an error event).
        self.stream_breaks = 0
        # Requests go through a lean client of our own (cloud/gateway/upstream.py); the polls
        # through aiohttp, created on first use inside the serving loop.
        self._upstream = UpstreamClient(
            connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.request_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.request_timeout_s
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.connect_timeout_s)

    @property
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60),
                timeout=self._timeout,
                # The gateway relays bodies as they come; no automatic decompression.
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        self._upstream.close()
        if self._session is not None:
            await self._session.close()

    # -- health and load -----------------------------------------------------------------------
    async def run_health_checks(self) -> None:
        """Poll the replicas' health and scrape their load, each on its own interval, until
        cancelled."""
        if not self.settings.upstreams:
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self._every(self.settings.health_interval_s, self._probe, before=self.discover),
                name="gateway-health",
            )
            tg.create_task(self._every(self.settings.load_interval_s, self.scrape), name="gateway-load")

    async def discover(self) -> None:
        """Look up every discovered upstream's addresses and make ``replicas`` match them."""
        if not self._discovered:
            return
        for name, (upstream, known) in self._discovered.items():
            parts = urlsplit(upstream.url.rstrip("/"))
            host, port = parts.hostname or "", parts.port or 80
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning(
                    "looking up pool upstream %s (%s) failed: %s; its replicas stay as known", name, host, exc
                )
                continue
            found = {str(info[4][0]) for info in infos}
            # A dual-stack pod has an IPv4 and an IPv6 address: one replica, not two.
            addresses = sorted({a for a in found if ":" not in a} or found)
            for gone in known.keys() - set(addresses):
                log.info("pool replica %s left (%s no longer resolves to it)", known.pop(gone).name, host)
            for address in addresses:
                if address not in known:
                    netloc = Origin(parts.scheme, address, port).authority
                    url = urlunsplit(parts._replace(netloc=netloc))
                    known[address] = Replica(f"{name}@{address}", url, upstream.api_key)
                    log.info("pool replica %s found (%s)", known[address].name, host)
        self.replicas = self._fixed + [
            known[address] for _, known in self._discovered.values() for address in sorted(known)
        ]

    async def _every(
        self,
        interval_s: float,
        check: Callable[[Replica], Awaitable[None]],
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        while True:
            if before is not None:
                try:
                    await before()
                except Exception:  # the checks of the replicas known must go on
                    log.exception("discovering pool replicas failed")
            replicas = self.replicas
            results = await asyncio.gather(*(check(r) for r in replicas), return_exceptions=True)
            for replica, result in zip(replicas, results, strict=True):
                # One replica's surprising answer must not stop the checks of all of them for good.
                if isinstance(result, Exception):
                    log.error("checking replica %s failed: %r", replica.name, result)
                elif isinstance(result, BaseException):
                    raise result
            await asyncio.sleep(interval_s)

    async def scrape(self, replica: Replica) -> None:
        """Read the replica's load gauges from its ``/metrics``."""
        try:
            async with self._client.get(
                f"{replica.root}/metrics",
                # The session relays bodies undecoded (auto_decompress=False), and vLLM's
                # exporter gzips for any client that accepts it.
                headers={"accept-encoding": "identity"},
                timeout=self._probe_timeout,
            ) as r:
                text = (await r.read()).decode(errors="replace") if r.status == 200 else ""
        except (TimeoutError, aiohttp.ClientError):
            replica.load = None  # unreachable: the health poll decides whether it is down
            return
        replica.load = parse_load(text, own_in_flight=replica.outstanding)
        replica.server = replica.load.gauges if replica.load is not None else None

    async def _probe(self, replica: Replica) -> None:
        try:
            async with self._client.get(
                f"{replica.url}/models", headers=replica.headers(), timeout=self._probe_timeout
            ) as r:
                ok, why = r.status == 200, f"health check answered HTTP {r.status}"
                if ok:
                    replica.models = _parse_models(await r.read())
            if ok and replica.server is not None:
                ok, why = await self._ready(replica, replica.server)
        except (TimeoutError, aiohttp.ClientError) as exc:
            ok, why = False, f"health check failed: {type(exc).__name__}: {exc}"
        if ok and not replica.up:
            log.info("pool replica %s is back up", replica.name)
        if not ok and replica.up:
            log.warning("pool replica %s is down: %s", replica.name, why)
        replica.up = ok
        if not ok:
            replica.last_error = why

    async def _ready(self, replica: Replica, server: LoadGauges) -> tuple[bool, str]:
        """The server's own readiness: /models keeps answering on a vLLM whose engine died, or on
        a pool whose engine thread stopped."""
        async with self._client.get(f"{replica.root}{server.ready_path}", timeout=self._probe_timeout) as r:
            if r.status == 404:
                # Not the server its metrics said: judged by /models until a scrape tells again.
                replica.server = None
                return True, ""
            return r.status == 200, f"{server.ready_path} answered HTTP {r.status}"

    def _mark_down(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        replica.last_error = why
        if replica.up:
            log.warning("pool replica %s failed a request and is marked down: %s", replica.name, why)
        replica.up = False

    def _timed_out(self, replica: Replica) -> UpstreamTimeout:
        self.timeouts += 1
        log.warning(
            "pool replica %s did not answer within %.0f s; it stays up",
            replica.name,
            self.settings.request_timeout_s,
        )
        return UpstreamTimeout(
            f"pool replica {replica.name} did not answer within {self.settings.request_timeout_s:g} s"
        )

    def _pick(self, tried: set[str], model: object) -> Replica | None:
        up = [r for r in self.replicas if r.up and r.name not in tried]
        listing = [r for r in up if r.models is not None and model in r.models]
        unknown = [r for r in up if r.models is None]
        # Lists may be a poll old: when none lists the model, the others are still asked (a 404
        # from each then reaches the client).
        candidates = listing or unknown or up
        return min(candidates, key=lambda r: (r.estimated_load, r.outstanding)) if candidates else None

    # -- requests ------------------------------------------------------------------------------
    async def models(self) -> ModelList:
        """The union of the models the replicas that are up say they serve."""
        seen: dict[str, ModelCard] = {}

        async def one(replica: Replica) -> None:
            try:
                async with self._client.get(
                    f"{replica.url}/models", headers=replica.headers(), timeout=self._probe_timeout
                ) as r:
                    r.raise_for_status()
                    replica.models = _parse_models(await r.read())
                for model in sorted(replica.models or ()):
                    seen.setdefault(model, ModelCard(id=model, owned_by=replica.name))
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.info("could not list models of %s: %s", replica.name, exc)

        await asyncio.gather(*(one(r) for r in self.replicas if r.up))
        return ModelList(data=list(seen.values()))

    def substitute(self, model: object, *, known_only: bool = False) -> str | None:
        """The nearest version of ``model`` ("name:version") that replicas up list (or the bare
        name, when that is all they list), when none lists ``model`` itself and every list is
        known (``known_only``: judged by the lists that are); None otherwise."""
        if not isinstance(model, str) or ":" not in model:
            return None
        up = [r for r in self.replicas if r.up and (r.models is not None or not known_only)]
        if any(r.models is None or model in r.models for r in up):
            return None
        name, _, version = model.partition(":")
        versions = {
            m.partition(":")[2]
            for r in up
            for m in r.models or ()
            if m.partition(":")[0] == name and ":" in m
        }
        chosen = closest_version(version, versions)
        if chosen is not None:
            return f"{name}:{chosen}"
        # Replicas that serve the name without saying which version (a hand-filled folder).
        return name if any(name in (r.models or ()) for r in up) else None

    async def forward(
        self, path: str, body: dict[str, Any], *, payload: bytes | None = None, closest: bool = False
    ) -> Response:
        """POST ``body`` to the least busy replica that is up, moving on to another when one fails.
        ``payload``: ``body`` as JSON, when the caller has it already (the client's own bytes are
        relayed as they came, not encoded again). ``closest``: a version no replica has may be
        answered by the nearest one (see above)."""
        if not self.settings.upstreams:
            raise NoPool("no pool is configured (gateway.upstreams)")
        if payload is None:
            payload = json.dumps(body).encode()
        if closest and (nearest := self.substitute(body.get("model"))) is not None:
            return await self._attempts(path, *self._substituted(body, nearest))
        answer = await self._attempts(path, body, payload)
        if answer.status_code == 404 and closest:
            # Every replica said it lacks the version, perhaps before a poll learned their
            # lists: learn them now and ask for the nearest.
            await self.models()
            if (nearest := self.substitute(body.get("model"), known_only=True)) is not None:
                return await self._attempts(path, *self._substituted(body, nearest))
        if answer.status_code == 404:
            model = body.get("model")
            # A replica that lists the model but is down makes the others' 404s no verdict.
            down = [r.name for r in self.replicas if not r.up and r.models is not None and model in r.models]
            if down:
                raise PoolUnavailable(
                    f"no pool replica could serve the request ({', '.join(down)} serves {model} but is down)",
                    retry_after_s=2,
                )
        return answer

    def _substituted(self, body: dict[str, Any], nearest: str) -> tuple[dict[str, Any], bytes]:
        log.info("no replica serves %s: asking for %s instead", body.get("model"), nearest)
        self.substitutions += 1
        changed = {**body, "model": nearest}
        return changed, json.dumps(changed).encode()

    async def _attempts(self, path: str, body: dict[str, Any], payload: bytes) -> Response:
        tried: set[str] = set()
        errors: list[str] = []
        not_found: Response | None = None
        for attempt in range(self.settings.max_attempts):
            replica = self._pick(tried, body.get("model"))
            if replica is None:
                break
            tried.add(replica.name)
            if attempt:
                self.retries += 1
            try:
                return await self._send(replica, path, body.get("model"), payload)
            except _ReplicaFailed as exc:
                errors.append(f"{replica.name}: {exc}")
            except _NotServedHere as exc:
                not_found = exc.response
        if not_found is not None and not errors:
            return not_found
        detail = "; ".join(errors) if errors else "none is up"
        raise PoolUnavailable(f"no pool replica could serve the request ({detail})", retry_after_s=2)

    async def _send(self, replica: Replica, path: str, model: object, payload: bytes) -> Response:
        replica.outstanding += 1
        try:
            upstream = await self._upstream.post(replica.url + path, payload, replica.post_headers)
        except _GENERATION_TIMEOUTS as exc:
            replica.outstanding -= 1
            raise self._timed_out(replica) from exc
        except _TRANSPORT_ERRORS as exc:
            replica.outstanding -= 1
            self._mark_down(replica, f"{type(exc).__name__}: {exc}")
            raise _ReplicaFailed(str(exc) or type(exc).__name__) from exc
        except BaseException:
            replica.outstanding -= 1  # cancelled (the client left) while sending
            raise
        headers = cloud_answer_headers(upstream.headers)
        headers[REPLICA_HEADER] = replica.name
        if upstream.status < 300 and (served := _header_value(replica.served_as(model))) is not None:
            headers[MODEL_HEADER] = served
        if upstream.status == 200 and upstream.headers.get("content-type", "").lower().startswith(
            "text/event-stream"
        ):
            replica.served += 1

            def broke(why: str, exc: BaseException | None) -> None:
                self.stream_breaks += 1
                if isinstance(exc, _GENERATION_TIMEOUTS):
                    # Silent past the timeout mid-answer: busy, as a replica that has not started
                    # answering in time is (see Timeouts above), not down.
                    self.timeouts += 1
                    log.warning("a stream from pool replica %s stalled: %s; it stays up", replica.name, why)
                    return
                log.warning("a stream from pool replica %s broke off: %s", replica.name, why)
                self._mark_down(replica, f"stream broke off: {why}")

            done = _Done(upstream, replica)
            try:
                return EventStream(_relay(upstream, broke), headers=headers, on_close=done)
            except BaseException:
                done()  # no response owns the stream: its connection and count go back here
                raise
        try:
            content = await upstream.read()
        except _GENERATION_TIMEOUTS as exc:
            raise self._timed_out(replica) from exc
        except _TRANSPORT_ERRORS as exc:
            self._mark_down(replica, f"answer cut off: {type(exc).__name__}")
            raise _ReplicaFailed(f"answer cut off ({type(exc).__name__})") from exc
        finally:
            upstream.release()
            replica.outstanding -= 1
        if upstream.status in _RETRY_STATUS:
            self._mark_down(replica, f"HTTP {upstream.status}")
            raise _ReplicaFailed(f"HTTP {upstream.status}: {content[:200].decode(errors='replace')}")
        kind = upstream.headers.get("content-type", "").split(";")[0].strip().lower()
        # A 2xx is parsed whatever its content type says: an empty body, or one the replica cut
        # short by closing a connection that delimits it, is no answer.
        if (upstream.status >= 500 and not _error_envelope(content)) or (
            upstream.status < 300 and _json_object(content) is None
        ):
            self.upstream_errors += 1
            log.warning(
                "pool replica %s answered HTTP %d (%s): %s",
                replica.name,
                upstream.status,
                kind or "no content-type",
                content[:300].decode(errors="replace"),
            )
            raise UpstreamError(
                f"pool replica {replica.name} answered HTTP {upstream.status}"
                + (
                    ""
                    if upstream.status >= 500
                    else f" ({kind or 'no content-type'}) that is not a JSON object"
                )
                + "; its answer is in the gateway's log"
            )
        response = Response(content, status_code=upstream.status, headers=headers)
        if upstream.status == 404:
            raise _NotServedHere(response)
        replica.served += 1
        return response


# What an answer header can carry of a model id: printable ASCII, bounded (ids are names and
# versions); anything else (a client's own name echoed back by a replica that accepts any) is
# left out rather than failing the answer after the replica did the work.
_HEADER_SAFE = re.compile(r"[!-~](?:[ -~]{0,254}[!-~])?")


def _header_value(value: str | None) -> str | None:
    return value if value is not None and _HEADER_SAFE.fullmatch(value) else None


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return None
    return parsed if isinstance(parsed, dict) else None


def _error_envelope(content: bytes) -> bool:
    """Whether ``content`` is an OpenAI error (``{"error": {"message": ...}}``): written for
    clients by an OpenAI-compatible server, so passed on as it is."""
    error = (_json_object(content) or {}).get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numbers compare as numbers ("10" after "9"), text as text, numbers before text."""
    # [0-9] only: \d and isdigit() take other digits ("²") that int() refuses (a 500), and a
    # run that long compares as text (int() refuses more than 4,300 digits).
    return tuple(
        (0, int(p)) if p.isascii() and p.isdigit() and len(p) <= 18 else (1, p)
        for p in re.findall(r"[0-9]+|[^0-9]+", version)
    )


def closest_version(wanted: str, available: set[str]) -> str | None:
    """The highest of ``available`` below ``wanted``, else the lowest above it (None: none)."""
    key = _version_key(wanted)
    below = [v for v in available if _version_key(v) < key]
    if below:
        return max(below, key=_version_key)
    above = [v for v in available if _version_key(v) > key]
    return min(above, key=_version_key) if above else None


def _parse_models(raw: bytes) -> frozenset[str] | None:
    try:
        return _model_ids(json.loads(raw))
    except (ValueError, RecursionError):
        return None


class _Done:
    """Called once, however a relayed stream ends (even one never started): the connection goes
    back (or is closed) and the replica's count goes down."""

    def __init__(self, upstream: UpstreamResponse, replica: Replica) -> None:
        self.upstream: UpstreamResponse | None = upstream
        self.replica = replica

    def __call__(self) -> None:
        if self.upstream is not None:
            self.upstream.release()
            self.upstream = None
            self.replica.outstanding -= 1


async def _relay(
    upstream: UpstreamResponse, on_break: Callable[[str, BaseException | None], None]
) -> AsyncIterator[bytes]:
    """The replica's stream, whole events at a time; a break ends it with an error event (see
    edge_agent/serving/sse.py). How it ends is EventStream's ``on_close`` (``_Done``).
    ``on_break`` hears why and what failed (None: the replica ended without ``[DONE]``)."""
    async for event in relay_events(
        upstream.iter_chunks(), errors=(*_TRANSPORT_ERRORS, *_GENERATION_TIMEOUTS), on_break=on_break
    ):
        yield event
