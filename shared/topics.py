"""MQTT topic names (DESIGN.md §4); the version lives in the topic root."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import ContractError
from shared.ids import is_valid_digest, is_valid_name

PROTOCOL_VERSION = "v1"

# ``bridge``: the state of the broker bridge of a node whose agent talks to a local broker
# (kubeedge/mosquitto-bridge.yaml), as mosquitto's bridge notifications publish it, b"1" up and
# b"0" down (the bridge's Last Will on the cloud's broker): a node that dies takes its agent's own
# Last Will with it, on its local broker.
DEVICE_CHANNELS = (
    "desired",
    "reported",
    "status",
    "telemetry",
    "fetch",
    "commands",
    "replies",
    "acks",
    "bridge",
)


def _is_number(text: str) -> bool:
    # ASCII digits only ("²".isdigit() is true, int() refuses it), and no more than int64's.
    return text.isascii() and text.isdigit() and len(text) <= 19


@dataclass(frozen=True)
class ParsedTopic:
    """What a concrete topic addresses: a device channel or a blob chunk."""

    channel: str
    device_id: str | None = None
    digest: str | None = None
    # A blob message is chunk ``chunk`` of a fixed-size chunking, or the run of whole chunks that
    # starts at byte ``offset``.
    chunk: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Topics:
    """Builds and parses every topic of one tenant."""

    tenant: str

    def __post_init__(self) -> None:
        if not is_valid_name(self.tenant):
            raise ContractError("invalid tenant name", tenant=self.tenant)

    @property
    def root(self) -> str:
        return f"autoglm/{PROTOCOL_VERSION}/{self.tenant}"

    def device(self, device_id: str, channel: str) -> str:
        if channel not in DEVICE_CHANNELS:
            raise ContractError("unknown device channel", channel=channel)
        if not is_valid_name(device_id):
            raise ContractError("invalid device id", device_id=device_id)
        return f"{self.root}/devices/{device_id}/{channel}"

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def reported(self, device_id: str) -> str:
        return self.device(device_id, "reported")

    def bridge(self, device_id: str) -> str:
        return self.device(device_id, "bridge")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def fetch(self, device_id: str) -> str:
        return self.device(device_id, "fetch")

    def commands(self, device_id: str) -> str:
        return self.device(device_id, "commands")

    def replies(self, device_id: str) -> str:
        return self.device(device_id, "replies")

    def acks(self, device_id: str) -> str:
        return self.device(device_id, "acks")

    def all_devices(self, channel: str) -> str:
        """Subscription filter for one channel of every device (cloud side)."""
        if channel not in DEVICE_CHANNELS:
            raise ContractError("unknown device channel", channel=channel)
        return f"{self.root}/devices/+/{channel}"

    def blob_chunk(self, digest: str, chunk: int) -> str:
        if not is_valid_digest(digest):
            raise ContractError("invalid blob digest", digest=digest)
        if chunk < 0:
            raise ContractError("negative chunk index", digest=digest, chunk=chunk)
        return f"{self.root}/blobs/{digest}/{chunk}"

    def blob_range(self, digest: str, offset: int) -> str:
        """The topic of a run of whole chunks of ``digest`` that starts at byte ``offset``."""
        if not is_valid_digest(digest):
            raise ContractError("invalid blob digest", digest=digest)
        if offset < 0:
            raise ContractError("negative blob offset", digest=digest, offset=offset)
        return f"{self.root}/blobs/{digest}/at/{offset}"

    def blob_chunks(self, digest: str) -> str:
        """Subscription filter for every chunk and range of one blob (device side)."""
        if not is_valid_digest(digest):
            raise ContractError("invalid blob digest", digest=digest)
        return f"{self.root}/blobs/{digest}/#"

    def parse(self, topic: str) -> ParsedTopic:
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise ContractError("topic outside this tenant", topic=topic)
        parts = topic[len(prefix) :].split("/")
        if len(parts) == 3 and parts[0] == "devices" and parts[2] in DEVICE_CHANNELS:
            if not is_valid_name(parts[1]):
                raise ContractError("invalid device id in topic", topic=topic)
            return ParsedTopic(channel=parts[2], device_id=parts[1])
        if len(parts) == 3 and parts[0] == "blobs":
            if not is_valid_digest(parts[1]) or not _is_number(parts[2]):
                raise ContractError("malformed blob topic", topic=topic)
            return ParsedTopic(channel="blob", digest=parts[1], chunk=int(parts[2]))
        if len(parts) == 4 and parts[0] == "blobs" and parts[2] == "at":
            if not is_valid_digest(parts[1]) or not _is_number(parts[3]):
                raise ContractError("malformed blob topic", topic=topic)
            return ParsedTopic(channel="blob", digest=parts[1], offset=int(parts[3]))
        raise ContractError("unknown topic", topic=topic)
