"""The one error model (shared/errors.py) and the one place it becomes HTTP
(edge_agent/serving/errors.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from edge_agent.serving.config import ServingConfig
from edge_agent.serving.errors import error_for
from edge_agent.serving.service import CompletionService
from shared import errors as e
from shared.openai_api import CompletionRequest


@pytest.mark.parametrize(
    ("exc", "status", "kind", "code"),
    [
        (e.InvalidRequest("bad", param="top_p"), 400, "invalid_request_error", "invalid_request"),
        (e.ContextTooLong("long", param="prompt"), 400, "invalid_request_error", "context_length_exceeded"),
        (e.ContractError("malformed"), 400, "invalid_request_error", "invalid_request"),
        (e.Unauthorized("who"), 401, "authentication_error", "invalid_api_key"),
        (e.Forbidden("scope"), 403, "permission_error", "insufficient_scope"),
        (e.NotFound("no such device"), 404, "not_found_error", "not_found"),
        (e.ModelNotFound("m"), 404, "not_found_error", "model_not_found"),
        (e.RegistryError("model not found"), 404, "not_found_error", "not_found"),
        (e.ModelInUse("r1"), 409, "invalid_request_error", "model_in_use"),
        (e.RequestTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (e.QueueFull("full", retry_after_s=3), 429, "rate_limit_error", "queue_full"),
        (e.RateLimited("slow down", retry_after_s=1), 429, "rate_limit_error", "rate_limited"),
        (e.EngineError("boom"), 500, "server_error", "engine_error"),
        (e.ModelNotReady("none", retry_after_s=5), 503, "server_error", "model_not_ready"),
        (e.EngineDown("stopped"), 503, "server_error", "engine_down"),
        (e.CloudUnavailable("unreachable"), 503, "server_error", "cloud_unavailable"),
        (e.PoolUnavailable("all down"), 503, "server_error", "pool_unavailable"),
        (e.NoPool("none configured"), 503, "server_error", "no_pool"),
        (e.UpstreamTimeout("slow"), 504, "server_error", "pool_timeout"),
        (e.IntegrityError("unlisted"), 500, "server_error", "internal_error"),
    ],
)
def test_every_error_has_one_http_answer(exc: e.AutoGLMError, status: int, kind: str, code: str) -> None:
    http = e.http_error(exc)
    assert (http.status, http.type, http.code) == (status, kind, code)
    response = error_for(exc)
    body = json.loads(bytes(response.body))["error"]
    assert response.status_code == status and body["type"] == kind and body["code"] == code
    if isinstance(exc, e.RequestError):
        assert (exc.status, exc.code) == (status, code)
        assert body["param"] == exc.param
        assert response.headers.get("retry-after") == (
            str(exc.retry_after_s) if exc.retry_after_s is not None else None
        )


def test_every_request_error_class_is_in_the_table() -> None:
    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    assert subclasses(e.RequestError) <= set(e.HTTP_ERRORS)


def test_a_request_error_answers_with_its_message_and_other_errors_with_their_context() -> None:
    ours = json.loads(bytes(error_for(e.ModelNotFound("not here", param="model", device_id="d1")).body))
    assert ours["error"]["message"] == "not here"
    theirs = json.loads(bytes(error_for(e.NotFound("no such device", device_id="d1")).body))
    assert theirs["error"]["message"] == "no such device"  # NotFound is a RequestError too
    contract = json.loads(bytes(error_for(e.ContractError("bad label", label="x")).body))
    assert contract["error"]["message"] == "bad label (label=x)"


def test_cloud_unavailable_asks_for_a_retry_by_default() -> None:
    assert e.CloudUnavailable("down").retry_after_s == 5
    assert e.CloudUnavailable("down", retry_after_s=None).retry_after_s is None


class _Served:
    model_id = "m:1"
    names = frozenset({"m", "m:1"})
    chat = None  # completions only
    digest = ""


class _BreaksMidStream:
    """A backend whose generation fails after its first piece went out."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.current = _Served()

    def require(self) -> _Served:
        return self.current

    async def generate(self, prompt: object, params: object) -> object:
        raise AssertionError("streams only")

    async def stream(self, prompt: object, params: object) -> tuple[_Served, AsyncIterator[str]]:
        async def items() -> AsyncIterator[str]:
            yield "Hel"
            raise self.failure

        return self.current, items()


@pytest.mark.parametrize(
    ("failure", "kind", "code"),
    [
        (RuntimeError("the model broke"), "server_error", None),
        (
            e.ContextTooLong("the answer outgrew the KV buffer"),
            "invalid_request_error",
            "context_length_exceeded",
        ),
    ],
)
def test_a_stream_that_fails_after_it_began_ends_with_an_error_event(
    failure: Exception, kind: str, code: str | None
) -> None:
    """The 200 and a first piece are out: the client reads the error as the last event (no
    [DONE]), not a connection that just ends."""
    service = CompletionService(_BreaksMidStream(failure), ServingConfig)  # type: ignore[arg-type]

    async def events() -> list[str]:
        stream = await service.complete_stream(CompletionRequest(model="m", prompt="hi", stream=True))
        return [event async for event in stream]

    got = asyncio.run(events())
    assert json.loads(got[0][6:])["choices"][0]["text"] == "Hel"
    assert got[-1].startswith("data: ") and got[-1].endswith("\n\n") and "[DONE]" not in "".join(got)
    error = json.loads(got[-1][6:])["error"]
    assert error["type"] == kind and error["code"] == code and error["message"]
