"""Running one batch request: on the local model or through the cloud, into its result line.

The same paths as a single request, so a batch answer has the same shape and is counted the same
way: locally ``CompletionService`` (which reports each request to telemetry through its
``on_finished``), in the cloud ``RequestRouter.via_cloud`` (which records the cloud's answers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edge_agent.batch.input_file import request_for
from edge_agent.batch.journal import Item, new_id
from edge_agent.routing.router import RequestRouter
from edge_agent.serving.service import CompletionService
from shared.batch_api import BatchOutputLine, BatchResponse
from shared.errors import InvalidRequest, RequestError, http_error
from shared.openai_api import ChatCompletionRequest, CompletionRequest, ErrorEnvelope, SamplingParams


@dataclass(frozen=True)
class Answer:
    """A request's result line and where it was made."""

    line: BatchOutputLine
    served_by: str


def answer(item: Item, status: int, body: dict[str, Any], served_by: str) -> Answer:
    response = BatchResponse(status_code=status, request_id=new_id("req_"), body=body, served_by=served_by)
    line = BatchOutputLine(id=new_id("batch_req_"), custom_id=item.custom_id, response=response, error=None)
    return Answer(line, served_by)


def refusal(item: Item, exc: RequestError, served_by: str) -> Answer:
    """A final error as OpenAI writes it in an error file: the status and the error envelope."""
    http = http_error(exc)
    return answer(
        item, http.status, ErrorEnvelope.of(exc.message, http.type, exc.param, http.code), served_by
    )


class ItemExecutor:
    def __init__(self, local: CompletionService, router: RequestRouter) -> None:
        self.local = local
        self.router = router

    def cloud_configured(self) -> bool:
        return self.router.serving().cloud_url is not None

    def cloud_retry_in(self) -> float:
        """Seconds until the cloud client's circuit breaker lets a request through."""
        return self.router.cloud.breaker.retry_in()

    async def run_local(self, item: Item) -> Answer:
        """The local model's answer; RequestError when the local side refuses the request."""
        request = _request(item)
        if isinstance(request, ChatCompletionRequest):
            result: Any = await self.local.chat(request)
        else:
            assert isinstance(request, CompletionRequest)
            result = await self.local.complete(request)
        return answer(item, 200, result.model_dump(mode="json"), "local")

    async def run_cloud(self, item: Item) -> Answer:
        """The cloud's answer, an error answer included; CloudUnavailable when there is none."""
        response = await self.router.via_cloud(_request(item), item.url.removeprefix("/v1"))
        return answer(item, response.status_code, _json_body(bytes(response.body)), "cloud")


def _request(item: Item) -> SamplingParams:
    # Checked when the batch was created; checked again in case the schemas changed since.
    try:
        return request_for(item.url, item.body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"body.{where}: {first.get('msg')}", param=where.split(".")[0]) from exc


def _json_body(content: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    text = content[:300].decode(errors="replace")
    return ErrorEnvelope.of(
        f"the cloud answered with a body that is not a JSON object: {text}", "server_error"
    )
