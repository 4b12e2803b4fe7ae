"""The edge's request router (edge_agent/routing/router.py): every policy against every kind of
local refusal and every cloud answer, with fakes at its two seams (the local responder and the
cloud client). Milliseconds; the real thing end to end is tests/test_fallback.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import Response

from edge_agent.routing.router import RequestRouter
from edge_agent.serving.config import ServingConfig
from shared import errors as e
from shared.edge_config import RouterPolicy
from shared.openai_api import ChatCompletionRequest, CompletionRequest


class FakeModel:
    model_id = "m:3"
    names = frozenset({"m", "m:3"})
    digest = "sha256:" + "a" * 64


class FakeLocal:
    def __init__(self, error: e.RequestError | None, model: FakeModel | None = None) -> None:
        self.error = error
        self.calls = 0
        self.model = model

    async def completions(self, body: Any) -> Response:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return Response(b"local", headers={"x-autoglm-served-by": "local"})

    def serving(self) -> Any:
        return self.model


class FakeCloud:
    def __init__(self, error: e.CloudUnavailable | None) -> None:
        self.error = error
        self.calls = 0
        self.sent: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def forward(
        self, path: str, body: dict[str, Any], **streaming: Any
    ) -> tuple[Response, dict[str, Any] | None]:
        self.calls += 1
        self.sent.append((body, streaming.get("headers") or {}))
        if self.error is not None:
            raise self.error
        return Response(b"cloud"), {"model": "m", "usage": {"prompt_tokens": 2, "completion_tokens": 3}}


class FakeTelemetry:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, **fields: Any) -> str:
        self.records.append(fields)
        return "id"


def route(
    policy: RouterPolicy,
    local_error: e.RequestError | None = None,
    cloud_error: e.CloudUnavailable | None = None,
    cloud_url: str | None = "http://cloud.test/v1",
) -> tuple[Response | e.RequestError, FakeLocal, FakeCloud, FakeTelemetry]:
    local, cloud, telemetry = FakeLocal(local_error), FakeCloud(cloud_error), FakeTelemetry()
    config = ServingConfig(router_policy=policy, cloud_url=cloud_url)
    router = RequestRouter(local, cloud, lambda: config, telemetry)  # type: ignore[arg-type]
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    try:
        return asyncio.run(router.completions(body)), local, cloud, telemetry
    except e.RequestError as exc:
        return exc, local, cloud, telemetry


FALLS_BACK = [
    e.ModelNotReady("no model", retry_after_s=5),
    e.ModelNotFound("not here"),
    e.QueueFull("full", retry_after_s=2),
    e.ContextTooLong("long", param="prompt"),
    e.EngineError("crashed"),
]
STAYS = [e.InvalidRequest("bad top_p", param="top_p"), e.Unauthorized("key")]


@pytest.mark.parametrize("local_error", FALLS_BACK, ids=lambda x: type(x).__name__)
def test_local_first_sends_what_the_local_side_cannot_take_to_the_cloud(local_error: e.RequestError) -> None:
    answer, local, cloud, telemetry = route(RouterPolicy.LOCAL_FIRST, local_error)
    assert isinstance(answer, Response) and answer.body == b"cloud"
    assert (local.calls, cloud.calls) == (1, 1)
    assert telemetry.records[0]["served_by"] == "cloud" and telemetry.records[0]["completion_tokens"] == 3


@pytest.mark.parametrize("local_error", STAYS, ids=lambda x: type(x).__name__)
def test_local_first_returns_a_bad_request_as_it_is(local_error: e.RequestError) -> None:
    answer, _, cloud, _ = route(RouterPolicy.LOCAL_FIRST, local_error)
    assert answer is local_error and cloud.calls == 0


def test_local_first_without_a_cloud_url_returns_the_local_refusal() -> None:
    full = e.QueueFull("full", retry_after_s=2)
    answer, _, cloud, _ = route(RouterPolicy.LOCAL_FIRST, full, cloud_url=None)
    assert answer is full and cloud.calls == 0


def test_local_only_never_calls_the_cloud() -> None:
    not_ready = e.ModelNotReady("no model")
    answer, _, cloud, _ = route(RouterPolicy.LOCAL_ONLY, not_ready)
    assert answer is not_ready and cloud.calls == 0


@pytest.mark.parametrize(
    ("local_error", "kind", "status"),
    [
        (e.ModelNotReady("no model", retry_after_s=5), e.CloudUnavailable, 503),
        (e.ModelNotFound("not here"), e.CloudUnavailable, 503),
        (e.QueueFull("full", retry_after_s=2), e.QueueFull, 429),
        (e.ContextTooLong("long", param="prompt"), e.ContextTooLong, 400),
    ],
    ids=lambda x: getattr(x, "__name__", None) or type(x).__name__,
)
def test_when_neither_side_can_serve_the_answer_gives_both_reasons(
    local_error: e.RequestError, kind: type[e.RequestError], status: int
) -> None:
    answer, _, _, telemetry = route(RouterPolicy.LOCAL_FIRST, local_error, e.CloudUnavailable("cloud down"))
    assert type(answer) is kind and isinstance(answer, e.RequestError) and answer.status == status
    assert local_error.message in answer.message and "cloud down" in answer.message
    assert answer.param == local_error.param
    assert answer.retry_after_s == (local_error.retry_after_s or 5)
    assert telemetry.records[0]["error"] == "cloud_unavailable"


def test_cloud_first_serves_locally_when_the_cloud_is_unavailable() -> None:
    answer, local, cloud, _ = route(RouterPolicy.CLOUD_FIRST, cloud_error=e.CloudUnavailable("breaker open"))
    assert isinstance(answer, Response) and answer.body == b"local" and (local.calls, cloud.calls) == (1, 1)


def test_cloud_first_uses_the_cloud_when_it_answers() -> None:
    answer, local, _, _ = route(RouterPolicy.CLOUD_FIRST)
    assert isinstance(answer, Response) and answer.body == b"cloud" and local.calls == 0


def test_cloud_only_never_serves_locally() -> None:
    answer, local, _, _ = route(RouterPolicy.CLOUD_ONLY, cloud_error=e.CloudUnavailable("down"))
    assert isinstance(answer, e.CloudUnavailable) and local.calls == 0


@pytest.mark.parametrize(
    ("asked", "sent", "closest"),
    [
        ("m", "m:3", True),
        ("default", "m:3", True),
        ("m:3", "m:3", False),  # asked for this version: that version or nothing
        ("m@" + FakeModel.digest, "m:3", False),
        ("m:2", "m:2", False),
        ("x", "x", False),
    ],
)
def test_the_cloud_is_asked_for_the_version_the_device_runs(asked: str, sent: str, closest: bool) -> None:
    """A request for the local model by name goes to the cloud as "name:version", with leave to
    answer with the closest version; one for this version (or its digest) exactly; one for
    another model as it is."""
    local, cloud = FakeLocal(e.QueueFull("full"), FakeModel()), FakeCloud(None)
    config = ServingConfig(router_policy=RouterPolicy.LOCAL_FIRST, cloud_url="http://cloud.test/v1")
    router = RequestRouter(local, cloud, lambda: config, FakeTelemetry())  # type: ignore[arg-type]
    asyncio.run(router.completions(CompletionRequest.model_validate({"model": asked, "prompt": "x"})))
    body, headers = cloud.sent[0]
    assert body["model"] == sent
    assert headers == ({"X-AutoGLM-Version-Fallback": "closest"} if closest else {})


@pytest.mark.parametrize(
    ("asked", "local_model", "ids"),
    [
        ("m", True, True),
        ("default", True, True),
        ("m:3", True, True),
        ("x", True, False),
        ("m", False, False),
    ],
)
def test_token_ids_are_asked_of_the_cloud_only_where_the_local_model_could_go_on(
    asked: str, local_model: bool, ids: bool
) -> None:
    """A broken cloud stream is finished locally from its token ids, so the edge asks for them;
    for a model this device does not run (or with none loaded) the request goes as sent, which an
    upstream that refuses unknown fields also answers."""
    local = FakeLocal(None, FakeModel() if local_model else None)
    cloud = FakeCloud(None)
    config = ServingConfig(router_policy=RouterPolicy.LOCAL_FIRST, cloud_url="http://cloud.test/v1")
    router = RequestRouter(local, cloud, lambda: config, FakeTelemetry())  # type: ignore[arg-type]
    body = ChatCompletionRequest.model_validate(
        {"model": asked, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    asyncio.run(router.via_cloud(body, "/chat/completions"))
    sent, _ = cloud.sent[0]
    assert sent.get("return_token_ids", False) is ids
