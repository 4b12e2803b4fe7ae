"""The edge's client of the cloud gateway: forwards an OpenAI request as the app sent it.

Connection failures, timeouts and 5xx answers count against a :class:`CircuitBreaker`; while it
is open, a request is refused at once with :class:`CloudUnavailable` instead of waiting for
another timeout. 4xx answers are the cloud's verdict on the request and pass through unchanged.
Streams are passed through byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from fastapi import Response

from edge_agent.routing.breaker import CircuitBreaker
from edge_agent.routing.resume import Continue, resumable_events
from edge_agent.serving.config import ServingConfig
from edge_agent.serving.service import cloud_answer_headers
from edge_agent.serving.sse import describe_error, is_done, relay_events
from edge_agent.serving.streaming import EventStream
from edge_agent.settings import url_allowed
from shared.errors import CloudUnavailable

log = logging.getLogger(__name__)

# What a failed hop raises: refused, reset, cut off, or timed out.
_HOP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class CloudFallback:
    # aiohttp rather than httpx on this hop: its C parser keeps what a fallback adds to a
    # request's latency under a millisecond (bench/fallback_overhead.py).
    def __init__(
        self,
        serving: Callable[[], ServingConfig],
        *,
        api_key: str | None,
        allowed_urls: frozenset[str],
        connect_timeout_s: float,
        breaker: CircuitBreaker,
    ) -> None:
        self.serving = serving
        self.api_key = api_key
        # The key goes only to these (the device's own configuration), whatever a push says.
        self.allowed_urls = allowed_urls
        self.connect_timeout_s = connect_timeout_s
        self.breaker = breaker
        self.forwarded = 0
        self.stream_breaks = 0
        # Broken cloud streams that the local model finished (routing/resume.py).
        self.streams_resumed = 0
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that serves the API.
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"user-agent": "autoglm-edge"})
        return self._session

    def _target(self, path: str) -> tuple[str, aiohttp.ClientTimeout]:
        cfg = self.serving()
        if cfg.cloud_url is None:
            raise CloudUnavailable("no cloud fallback is configured (router.cloud_url)")
        if not url_allowed(cfg.cloud_url, self.allowed_urls):
            # Pushes are checked when applied; this guards every other way a URL could get here.
            raise CloudUnavailable("router.cloud_url is not one this device allows", url=cfg.cloud_url)
        if not self.breaker.allow():
            raise CloudUnavailable(
                f"the cloud fallback failed {self.breaker.failures} time(s) in a row; "
                f"circuit open, next probe in {self.breaker.retry_in():.1f}s"
            )
        connect = min(self.connect_timeout_s, cfg.cloud_timeout_s)
        # A limit on silence, not on the whole answer: a total cut a healthy stream that was
        # still sending tokens at cloud_timeout_s, and counted it against the breaker.
        # ``connect`` bounds what comes before the socket too (DNS, a free pooled connection):
        # a probe that hung there would keep the breaker half-open.
        return cfg.cloud_url.rstrip("/") + path, aiohttp.ClientTimeout(
            total=None, connect=cfg.cloud_timeout_s, sock_connect=connect, sock_read=cfg.cloud_timeout_s
        )

    async def _send(
        self, url: str, body: dict[str, Any], limits: aiohttp.ClientTimeout, extra: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """The upstream's answer with its verdict given to the breaker (a 5xx is a failure even
        when its body breaks off)."""
        try:
            headers = {**extra, **({"authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
            upstream = await self._client().post(url, json=body, timeout=limits, headers=headers)
        except _HOP_ERRORS as exc:
            raise self._failed(url, describe_error(exc)) from exc
        if upstream.status >= 500:
            try:
                detail = (await upstream.read())[:300].decode(errors="replace")
            except _HOP_ERRORS as exc:
                detail = f"(the body broke off: {describe_error(exc)})"
            finally:
                upstream.release()
            raise self._failed(url, f"HTTP {upstream.status}: {detail}")
        self.breaker.success()
        return upstream

    def _failed(self, url: str, why: str) -> CloudUnavailable:
        self.breaker.failure()
        log.warning("cloud fallback %s failed: %s (breaker %s)", url, why, self.breaker.state)
        return CloudUnavailable(f"the cloud fallback failed: {why}", url=url)

    def _broke(self, why: str, failure: BaseException | None = None) -> None:
        """A stream from the cloud broke off mid-answer: counted, and a failure to the breaker
        whatever failed (a stalled cloud is as unusable to this request as a cut one)."""
        self.stream_breaks += 1
        self.breaker.failure()
        log.warning("a stream from the cloud broke off: %s", why)

    async def _post(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[str, aiohttp.ClientResponse]:
        url, timeout = self._target(path)
        try:
            return url, await self._send(url, body, timeout, headers)
        except BaseException:
            # Cancelled (the client left) or an error that is no verdict on the cloud: whatever
            # happened, a probe must not stay outstanding (the breaker would refuse forever).
            self.breaker.abandon()
            raise

    async def forward(
        self,
        path: str,
        body: dict[str, Any],
        *,
        take_over: Continue | None = None,
        strip_token_ids: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Response, dict[str, Any] | None]:
        """POST ``body`` (with ``headers``) to the gateway; the answer, and its JSON when it was
        not a stream. A stream that breaks is finished by ``take_over`` when it gives a
        continuation."""
        url, upstream = await self._post(path, body, headers or {})
        self.forwarded += 1
        answer_headers = cloud_answer_headers(upstream.headers)
        if upstream.content_type == "text/event-stream":
            if take_over is not None and upstream.status < 300:

                def resumed() -> None:
                    self.streams_resumed += 1

                def broke(why: str) -> None:
                    self._broke(why)
                    # The broken connection goes now, not after the local continuation ends.
                    upstream.release()

                events = resumable_events(
                    upstream.content.iter_any(),
                    errors=_HOP_ERRORS,
                    on_break=broke,
                    take_over=take_over,
                    strip_token_ids=strip_token_ids,
                    on_resumed=resumed,
                )
                return EventStream(
                    _released(upstream, events), status_code=upstream.status, headers=answer_headers
                ), None
            return EventStream(
                _passthrough(upstream, self._broke), status_code=upstream.status, headers=answer_headers
            ), None
        try:
            content = await upstream.read()
        except _HOP_ERRORS as exc:
            raise self._failed(url, f"the answer broke off: {describe_error(exc)}") from exc
        finally:
            upstream.release()
        parsed: dict[str, Any] | None = None
        if upstream.status < 300 and upstream.content_type == "application/json":
            try:
                parsed = json.loads(content)
            except ValueError:
                parsed = None
        return Response(content, status_code=upstream.status, headers=answer_headers), parsed

    async def open_stream(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming ``body``; its chunks as they come (an error event included, as a
        chunk), once the cloud has accepted it: CloudUnavailable before that, for any refusal."""
        url, upstream = await self._post(path, body, headers or {})
        if upstream.status >= 300 or upstream.content_type != "text/event-stream":
            try:
                detail = (await upstream.read())[:300].decode(errors="replace")
            except _HOP_ERRORS as exc:
                detail = describe_error(exc)
            finally:
                upstream.release()
            raise CloudUnavailable(f"the cloud refused to go on: HTTP {upstream.status}: {detail}", url=url)
        self.forwarded += 1

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            try:
                async for events in relay_events(
                    upstream.content.iter_any(), errors=_HOP_ERRORS, on_break=self._broke
                ):
                    for event in events.split(b"\n\n"):
                        data = event.strip()
                        if not data.startswith(b"data:") or is_done(data):
                            continue
                        try:
                            parsed = json.loads(data[5:])
                        except ValueError:
                            continue
                        if isinstance(parsed, dict):
                            yield parsed
            finally:
                upstream.release()

        return chunks()


async def _released(upstream: aiohttp.ClientResponse, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    finally:
        upstream.release()


async def _passthrough(
    upstream: aiohttp.ClientResponse, on_break: Callable[[str, BaseException | None], None]
) -> AsyncIterator[bytes]:
    """The cloud's stream, whole events at a time; one that breaks off ends with an error event
    (edge_agent/serving/sse.py), never as if the answer were complete."""
    try:
        async for event in relay_events(upstream.content.iter_any(), errors=_HOP_ERRORS, on_break=on_break):
            yield event
    finally:
        upstream.release()
