"""MQTT control messages (DESIGN.md §4). Chunk payloads are raw bytes and have no model."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SerializerFunctionWrapHandler, StrictBool, model_serializer, model_validator

from shared.errors import ImpersonationError
from shared.ids import Digest, Name
from shared.signing import Signature
from shared.wire import Text, WireDocument, WireModel

# v2: desired states and commands are signed by the control key and name their device, tenant
# and expiry; commands carry a monotonic counter; reported states say why a control message was
# refused (DESIGN.md §4, §8); the control plane acknowledges stored telemetry and reported states
# by id on the device's ``acks`` topic, and only then does the device forget them (§4, §5).
# v3: the phase of a switch to the model already in the other slot is ``switching`` (it was
# ``rolling_back``, but a desired state naming the older model and the ``rollback`` command are
# not the only switches: re-selecting any model the standby slot holds is one too).
MQTT_SCHEMA = "autoglm.mqtt/v3"

# Revisions are int64 everywhere (the control plane's column): a larger one would pin a device to
# it forever and no longer fit the fleet's database.
MAX_REVISION = 2**63 - 1
# Byte and token counts a device reports: what a BIGINT column and the console's arithmetic
# hold (10**3000 bytes done made the fleet page divide into an OverflowError).
MAX_COUNT = 2**63 - 1
# Upper bounds keep one message from asking for an unbounded amount of work.
MAX_BLOBS_PER_FETCH = 64
MAX_CHUNKS_PER_BLOB_REQUEST = 4096
# A byte range asked for is a run of whole chunks, no longer than the largest chunk size.
MAX_RANGE_BYTES = 16 * 1024 * 1024
MAX_TELEMETRY_RECORDS = 1000


def utc_now() -> datetime:
    return datetime.now(UTC)


class ModelRef(WireModel):
    """Which model a device should run: the manifest digest pins the exact bytes."""

    name: Name
    version: Name
    manifest_digest: Digest
    manifest_size: Annotated[int, Field(strict=True, gt=0, le=64 * 1024 * 1024)]


Revision = Annotated[int, Field(strict=True, ge=0, le=MAX_REVISION)]


class SignedControl(WireDocument):
    """What every control message carries beside its content: for whom, until when, signed by
    whom. Built unsigned in code; :mod:`shared.control` fills these fields when it signs."""

    device_id: Name | None = None
    tenant: Name | None = None
    issued_at: datetime = Field(default_factory=utc_now)
    expires_at: datetime | None = None
    signature: Signature | None = None


class DesiredState(SignedControl):
    SCHEMA = MQTT_SCHEMA
    KIND = "desired"

    # Signed and monotonic per device: a lower revision than one applied is a replay.
    revision: Revision
    model: ModelRef | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    # The operator's authorization to install a release lower than the highest this device has
    # installed of that model (a rollback); without it a device refuses the downgrade.
    allow_downgrade: StrictBool = False


# Ids of what a device sends through its outbox (telemetry records, reported states).
RecordId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class Phase(StrEnum):
    """Update phases of the edge reconciler, in the order a healthy update walks them."""

    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    STAGED = "staged"
    SMOKE_TESTING = "smoke_testing"
    ACTIVE = "active"
    SWITCHING = "switching"  # to the model the standby slot holds: nothing to download
    FAILED = "failed"


class ErrorInfo(WireModel):
    code: Text
    message: Text
    at: datetime = Field(default_factory=utc_now)


class Capabilities(WireModel):
    providers: list[Text] = Field(default_factory=list)
    memory_bytes: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)] = 0
    disk_free_bytes: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)] = 0


class TransferProgress(WireModel):
    bytes_done: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
    bytes_total: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]


class EvalReport(WireModel):
    """What a device measured with a package's evaluation set (shared/manifest.py ``EvalSet``)
    on the model it activated."""

    model: Text  # name:version evaluated
    reference: Text  # the model whose answers the set holds
    cases: Annotated[int, Field(strict=True, ge=1)]
    tokens: Annotated[int, Field(strict=True, ge=1)]
    # Share of the reference answers' tokens that are this model's top choice, given the
    # reference answer so far (teacher-forced: one early difference does not sink the rest).
    agreement: Annotated[float, Field(ge=0.0, le=1.0)]
    expected: Annotated[float, Field(ge=0.0, le=1.0)]  # the packager's figure for the same graph


class ReportedState(WireDocument):
    SCHEMA = MQTT_SCHEMA
    KIND = "reported"

    device_id: Name
    revision: Annotated[int, Field(strict=True, ge=-1, le=MAX_REVISION)]
    phase: Phase
    active_slot: Literal["a", "b"] | None = None
    slots: dict[Literal["a", "b"], ModelRef | None] = Field(default_factory=dict)
    last_error: ErrorInfo | None = None
    capabilities: Capabilities = Field(default_factory=Capabilities)
    progress: TransferProgress | None = None
    # The desired revision being worked on (or that failed, with phase "failed"); -1 when none.
    target_revision: Annotated[int, Field(strict=True, ge=-1, le=MAX_REVISION)] = -1
    # Revision whose config is in force, and why the latest pushed config was refused (if it was).
    config_revision: Annotated[int, Field(strict=True, ge=-1, le=MAX_REVISION)] = -1
    config_error: ErrorInfo | None = None
    # Unique per report: the control plane acknowledges it by this id once stored.
    report_id: RecordId | None = None
    # The last control message (desired state, command) this device refused and why; cleared
    # when a valid desired state arrives.
    control_error: ErrorInfo | None = None
    # The evaluation set's result for the model last activated (packages that carry one).
    evaluation: EvalReport | None = None
    updated_at: datetime = Field(default_factory=utc_now)


class DeviceStatus(WireDocument):
    """Retained presence; the broker publishes the ``offline`` one as the Last Will."""

    SCHEMA = MQTT_SCHEMA
    KIND = "status"

    device_id: Name
    state: Literal["online", "offline"]
    at: datetime = Field(default_factory=utc_now)


class TelemetryRecord(WireModel):
    id: RecordId
    at: datetime
    model: Text
    served_by: Literal["local", "cloud"]
    prompt_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
    completion_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
    # Finite: an infinite latency drew NaN in the console and could never fail a health gate.
    latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    ok: StrictBool = True
    error: Text | None = None


class TelemetryBatch(WireDocument):
    SCHEMA = MQTT_SCHEMA
    KIND = "telemetry"

    device_id: Name
    records: Annotated[list[TelemetryRecord], Field(min_length=1, max_length=MAX_TELEMETRY_RECORDS)]


class BlobRequest(WireModel):
    """Parts of one blob to publish: chunk indexes of its fixed-size chunking (``chunk_size``), or
    byte ranges (``[offset, length]``, for chunks cut at chosen offsets: each range is a run of
    whole chunks, sent as one message on ``blobs/{digest}/at/{offset}``). Exactly one of the two."""

    digest: Digest
    chunk_size: Annotated[int, Field(strict=True, gt=0, le=16 * 1024 * 1024)]
    chunks: (
        Annotated[
            list[Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]],
            Field(min_length=1, max_length=MAX_CHUNKS_PER_BLOB_REQUEST),
        ]
        | None
    ) = None
    ranges: (
        Annotated[
            list[
                tuple[
                    Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)],
                    Annotated[int, Field(strict=True, gt=0, le=MAX_RANGE_BYTES)],
                ]
            ],
            Field(min_length=1, max_length=MAX_CHUNKS_PER_BLOB_REQUEST),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_kind_unique(self) -> BlobRequest:
        if (self.chunks is None) == (self.ranges is None):
            raise ValueError("a blob request names either chunks or ranges")
        if self.chunks is not None and len(set(self.chunks)) != len(self.chunks):
            raise ValueError("chunk indexes must be unique")
        if self.ranges is not None and len({offset for offset, _ in self.ranges}) != len(self.ranges):
            raise ValueError("range offsets must be unique")
        return self

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A request by chunk index stays the bytes it was before ranges existed (older clouds).
        data = handler(self)
        if isinstance(data, dict):
            for key in ("chunks", "ranges"):
                if data.get(key, 0) is None:
                    del data[key]
        return data

    @property
    def parts(self) -> int:
        return len(self.chunks or self.ranges or ())


class FetchRequest(WireDocument):
    """A device asks for the chunks it still misses; the cloud publishes them on blob topics."""

    SCHEMA = MQTT_SCHEMA
    KIND = "fetch"

    device_id: Name
    request_id: Annotated[str, Field(min_length=1, max_length=64)]
    blobs: Annotated[list[BlobRequest], Field(min_length=1, max_length=MAX_BLOBS_PER_FETCH)]


class Command(SignedControl):
    SCHEMA = MQTT_SCHEMA
    KIND = "command"

    request_id: Annotated[str, Field(min_length=1, max_length=64)]
    # Signed and monotonic per device (the control plane's database allocates it): a command
    # whose counter is not above the last one obeyed is a replay.
    counter: Revision = 0
    action: Literal["ping", "reload", "rollback"]
    args: dict[str, Any] = Field(default_factory=dict)


class Ack(WireDocument):
    """The control plane stored these records and reports (by id): the device may forget them."""

    SCHEMA = MQTT_SCHEMA
    KIND = "ack"

    ids: Annotated[list[RecordId], Field(min_length=1, max_length=MAX_TELEMETRY_RECORDS)]


class CommandReply(WireDocument):
    SCHEMA = MQTT_SCHEMA
    KIND = "reply"

    request_id: Annotated[str, Field(min_length=1, max_length=64)]
    device_id: Name
    ok: StrictBool
    detail: Text = ""


DeviceMessage = TypeVar(
    "DeviceMessage", ReportedState, DeviceStatus, TelemetryBatch, FetchRequest, CommandReply
)


def from_device(
    cls: type[DeviceMessage], payload: bytes, topic_device: str | None, topic: str
) -> DeviceMessage:
    """Parse a device's message, taking its identity from the topic (which the broker's ACL binds
    to the sender's credentials), never from the payload: one naming another device is refused."""
    message = cls.from_json(payload)
    if message.device_id != topic_device:
        raise ImpersonationError(
            f"a {cls.KIND} message names device {message.device_id!r} on the topic of {topic_device!r}",
            topic=topic,
        )
    return message
