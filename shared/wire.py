"""Base class and strict decoding for every JSON document on the wire."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ContractError

# Control messages are small; anything larger is a bug or an attack.
MAX_CONTROL_PAYLOAD = 256 * 1024

T = TypeVar("T", bound="WireDocument")


def _storable(value: str) -> str:
    # JSON allows "\u0000" and a lone surrogate ("\ud800") in a string; PostgreSQL's text columns
    # refuse the first, UTF-8 (the JSON columns, every driver) the second, and a report that held
    # one failed its whole batch and was refused again each time the device sent it again. Free
    # text is shown, not compared: the replacement character stands in.
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


# Free text a device sends (error messages, details): stored and shown as it came, but for NUL
# and lone surrogates.
Text = Annotated[str, AfterValidator(_storable)]


def canonical_json(data: Any) -> bytes:
    """One byte form per value: sorted keys, no whitespace, UTF-8. Signatures and digests use it."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


class WireModel(BaseModel):
    """A nested part of a wire document: strict, immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WireDocument(WireModel):
    """A top-level wire document, identified by its ``schema`` and ``kind`` fields."""

    SCHEMA: ClassVar[str]
    KIND: ClassVar[str]
    MAX_BYTES: ClassVar[int] = MAX_CONTROL_PAYLOAD

    # Filled from SCHEMA/KIND when constructed in code; checked strictly when parsed from the wire.
    schema_: str = Field(default="", alias="schema")
    kind: str = ""

    @model_validator(mode="before")
    @classmethod
    def _fill_identity(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {"schema": cls.SCHEMA, "kind": cls.KIND, **data}
        return data

    def to_json(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True, exclude_none=False))

    @classmethod
    def from_json(cls: type[T], payload: bytes | str) -> T:
        """Parse and validate; every failure is a ContractError that says why."""
        raw = payload.encode("utf-8") if isinstance(payload, str) else payload
        if len(raw) > cls.MAX_BYTES:
            raise ContractError(
                f"{cls.KIND} payload of {len(raw)} bytes exceeds the {cls.MAX_BYTES}-byte limit"
            )
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContractError(f"malformed JSON in {cls.KIND} payload: {exc}") from exc
        except (ValueError, RecursionError) as exc:
            # An integer of more digits than Python converts, or nesting past the recursion limit:
            # a ContractError like any bad payload, not an exception that ends a message loop.
            raise ContractError(f"unreadable JSON in {cls.KIND} payload: {type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise ContractError(f"{cls.KIND} payload must be a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != cls.SCHEMA:
            raise ContractError(f"unsupported schema {schema!r} for {cls.KIND}, expected {cls.SCHEMA!r}")
        kind = data.get("kind")
        if kind != cls.KIND:
            raise ContractError(f"unexpected kind {kind!r}, expected {cls.KIND!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise ContractError(f"invalid {cls.KIND} payload: {problems}") from exc

    def model_post_init(self, __context: Any) -> None:
        if self.schema_ != type(self).SCHEMA or self.kind != type(self).KIND:
            raise ValueError(f"schema/kind must be {type(self).SCHEMA!r}/{type(self).KIND!r}")
