"""The MQTT wire contract: every message round-trips, every kind of bad input is a ContractError."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.errors import ContractError
from shared.messages import (
    BlobRequest,
    Command,
    CommandReply,
    DesiredState,
    DeviceStatus,
    FetchRequest,
    ModelRef,
    Phase,
    ReportedState,
    TelemetryBatch,
    TelemetryRecord,
    utc_now,
)
from shared.topics import Topics
from shared.wire import MAX_CONTROL_PAYLOAD

DIGEST = "sha256:" + "ab" * 32
REF = ModelRef(name="m", version="1", manifest_digest=DIGEST, manifest_size=100)

EXAMPLES = [
    DesiredState(revision=3, model=REF, config={"threads": 2}),
    ReportedState(
        device_id="dev-1", revision=3, phase=Phase.ACTIVE, active_slot="a", slots={"a": REF, "b": None}
    ),
    DeviceStatus(device_id="dev-1", state="offline"),
    TelemetryBatch(
        device_id="dev-1",
        records=[
            TelemetryRecord(
                id="rec-00000001",
                at=utc_now(),
                model="m:1",
                served_by="local",
                prompt_tokens=3,
                completion_tokens=5,
                latency_ms=12.5,
            )
        ],
    ),
    FetchRequest(
        device_id="dev-1", request_id="r1", blobs=[BlobRequest(digest=DIGEST, chunk_size=1024, chunks=[0, 2])]
    ),
    Command(request_id="c1", action="ping"),
    CommandReply(request_id="c1", device_id="dev-1", ok=True, detail="pong"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.KIND)
def test_every_message_round_trips_and_carries_schema_and_kind(message):  # type: ignore[no-untyped-def]
    data = message.to_json()
    doc = json.loads(data)
    assert doc["schema"] == "autoglm.mqtt/v3"
    assert doc["kind"] == message.KIND
    assert type(message).from_json(data) == message


def _desired(**override: object) -> bytes:
    doc = json.loads(DesiredState(revision=1, model=REF).to_json())
    doc.update(override)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (_desired(schema="autoglm.mqtt/v0"), "unsupported schema"),
        (_desired(schema=None), "unsupported schema"),
        (_desired(kind="reported"), "unexpected kind"),
        (_desired(revision="1"), "revision"),
        (_desired(revision=-5), "revision"),
        (_desired(surprise=True), "surprise"),
        (_desired(model={"name": "m"}), "model"),
        (_desired(model={**REF.model_dump(), "manifest_digest": "md5:abc"}), "manifest_digest"),
        (b" " * (MAX_CONTROL_PAYLOAD + 1), "exceeds"),
    ],
)
def test_bad_payloads_raise_one_error_type_with_a_clear_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError, match=reason):
        DesiredState.from_json(payload)


def test_fetch_request_bounds_are_enforced() -> None:
    base = json.loads(
        FetchRequest(
            device_id="d", request_id="r", blobs=[BlobRequest(digest=DIGEST, chunk_size=1024, chunks=[0])]
        ).to_json()
    )
    dup = {**base, "blobs": [{"digest": DIGEST, "chunk_size": 1024, "chunks": [1, 1]}]}
    with pytest.raises(ContractError, match="unique"):
        FetchRequest.from_json(json.dumps(dup))
    huge = {**base, "blobs": [{"digest": DIGEST, "chunk_size": 1 << 30, "chunks": [0]}]}
    with pytest.raises(ContractError, match="chunk_size"):
        FetchRequest.from_json(json.dumps(huge))
    empty = {**base, "blobs": []}
    with pytest.raises(ContractError, match="blobs"):
        FetchRequest.from_json(json.dumps(empty))


def test_topics_build_and_parse() -> None:
    t = Topics("acme")
    assert t.desired("dev-1") == "autoglm/v1/acme/devices/dev-1/desired"
    assert t.all_devices("fetch") == "autoglm/v1/acme/devices/+/fetch"
    assert t.blob_chunk(DIGEST, 7) == f"autoglm/v1/acme/blobs/{DIGEST}/7"
    parsed = t.parse(t.blob_chunk(DIGEST, 7))
    assert (parsed.channel, parsed.digest, parsed.chunk) == ("blob", DIGEST, 7)
    assert t.parse(t.reported("dev-1")).device_id == "dev-1"


@pytest.mark.parametrize("bad", ["dev/1", "dev+", "#", "", ".hidden", "x" * 65])
def test_topics_refuse_ids_that_would_escape_their_namespace(bad: str) -> None:
    with pytest.raises(ContractError):
        Topics("acme").desired(bad)


def test_topics_refuse_foreign_and_unknown_topics() -> None:
    t = Topics("acme")
    for topic in [
        "autoglm/v1/other/devices/d/desired",
        "autoglm/v1/acme/devices/d/nope",
        "autoglm/v1/acme/blobs/x/1",
    ]:
        with pytest.raises(ContractError):
            t.parse(topic)


def test_unimplemented_openai_parameters_are_named_not_ignored() -> None:
    from shared.openai_api import ChatCompletionRequest, CompletionRequest

    def req(**fields: object) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
        )

    assert req().unsupported() == []
    assert req(functions=[{"name": "f"}], suffix="}", best_of=2).unsupported() == [
        "best_of",
        "functions",
        "suffix",
    ]
    # Explicitly not asking is not asking.
    assert req(functions=None, suffix=None, response_format={"type": "text"}, best_of=1).unsupported() == []
    # Chat's parameters on the completions endpoint are refused by name too.
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "tools": [], "top_logprobs": 2}
    )
    assert completion.unsupported() == ["top_logprobs"]
    assert req(stream_options={"include_usage": True}).unsupported() == []
    # Explicit nulls are "not given", as OpenAI takes them.
    nulls = req(logprobs=None, top_logprobs=None, tools=None, tool_choice=None, parallel_tool_calls=None)
    assert nulls.logprobs_wanted() is None and nulls.unsupported() == []
    assert (
        req(logprobs=True, top_logprobs=3).logprobs_wanted() == 3
        and req(logprobs=True).logprobs_wanted() == 0
    )
    assert req(stream=True, stream_options={"include_usage": True}).wants_usage()
    assert (
        not req(stream=True).wants_usage() and not req(stream_options={"include_usage": True}).wants_usage()
    )
    assert req(max_completion_tokens=7).token_limit() == 7
    assert req(max_tokens=7, max_completion_tokens=7).token_limit() == 7


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_sampling_float_that_is_not_finite_is_refused_as_such(field: str, value: float) -> None:
    """NaN fails every bound: it was refused as if it were too large ("should be ≤ 2")."""
    from shared.openai_api import CompletionRequest

    with pytest.raises(ValidationError, match="finite number"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
    with pytest.raises(ValidationError, match="finite number"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"7": value}})


def test_a_devices_counts_are_bounded_and_finite() -> None:
    """10**3000 bytes done broke the console's fleet page (an OverflowError, a 500 for every
    operator of the tenant); an infinite latency drew NaN and could never fail a health gate."""
    from shared.messages import Capabilities, TelemetryRecord, TransferProgress

    with pytest.raises(ValidationError):
        TransferProgress(bytes_done=10**3000, bytes_total=1)
    with pytest.raises(ValidationError):
        Capabilities(memory_bytes=10**400)
    record = {"id": "record-0001", "at": "2026-12-07T12:00:00Z", "model": "m", "served_by": "local"}
    record |= {"prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0}
    TelemetryRecord.model_validate(record)
    for bad in ({"latency_ms": float("inf")}, {"latency_ms": float("nan")}, {"prompt_tokens": 2**63}):
        with pytest.raises(ValidationError):
            TelemetryRecord.model_validate(record | bad)
