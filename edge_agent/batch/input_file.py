"""Reading a batch input file: JSONL, one request per line, every line checked before a batch exists.

A batch is refused whole (400, the message naming the line) rather than half-run: bad JSON, a
missing or repeated ``custom_id``, a ``url`` other than the batch's endpoint, a body that is not a
valid request for it (the same schemas as a single request: ``shared.openai_api``), a streaming
request, a parameter this server does not implement, or more lines than allowed.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from shared.batch_api import BatchInputLine
from shared.errors import InvalidRequest
from shared.openai_api import ChatCompletionRequest, CompletionRequest, SamplingParams

PARAM = "input_file_id"

REQUEST_SCHEMAS: dict[str, type[SamplingParams]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


def request_for(url: str, body: dict[str, Any]) -> SamplingParams:
    """The body of a batch line as the request its endpoint takes (ValidationError if it is not one)."""
    return REQUEST_SCHEMAS[url].model_validate(body)


def parse_input_file(content: bytes, endpoint: str, max_lines: int) -> list[BatchInputLine]:
    """The requests of ``content``; InvalidRequest naming the first bad line (numbered from 1)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the input file is not UTF-8 text (byte {exc.start})", param=PARAM) from exc
    lines: list[BatchInputLine] = []
    seen: set[str] = set()
    # JSONL lines end at "\n" (a "\r" before it is dropped): str.splitlines also splits at U+2028,
    # U+0085 and others, which json.dumps(ensure_ascii=False) leaves raw inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise InvalidRequest(
                f"line {number}: the input file has more than {max_lines} requests", param=PARAM
            )
        line = _parse_line(number, raw, endpoint)
        if line.custom_id in seen:
            raise InvalidRequest(
                f"line {number}: custom_id {line.custom_id!r} is used by an earlier line; "
                "each request needs its own",
                param=PARAM,
            )
        seen.add(line.custom_id)
        lines.append(line)
    if not lines:
        raise InvalidRequest("the input file has no requests", param=PARAM)
    return lines


def _parse_line(number: int, raw: str, endpoint: str) -> BatchInputLine:
    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(f"line {number}: {why}", param=PARAM)

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise refuse(f"not valid JSON ({exc})") from exc
    except RecursionError as exc:  # [[[[… thousands deep: the parser's stack, not the server
        raise refuse("JSON nested too deeply") from exc
    if not isinstance(data, dict):
        raise refuse("not a JSON object")
    try:
        line = BatchInputLine.model_validate(data)
    except ValidationError as exc:
        raise refuse(_first_problem(exc)) from exc
    if line.url != endpoint:
        raise refuse(f"url {line.url!r} is not the batch's endpoint {endpoint!r}")
    try:
        request = request_for(line.url, line.body)
    except ValidationError as exc:
        raise refuse(f"body.{_first_problem(exc)}") from exc
    if request.stream:
        raise refuse("body.stream: a batch request cannot stream")
    refused = request.unsupported()
    if refused:
        raise refuse(f"body.{refused[0]}: not supported by this server")
    try:
        request.token_limit()
    except ValueError as exc:
        raise refuse(f"body.max_completion_tokens: {exc}") from exc
    return line


def _first_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "line"
    return f"{where}: {first.get('msg')}"
