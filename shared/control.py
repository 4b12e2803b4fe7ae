"""Signed control messages (DESIGN.md §4, §8): what tells a device *what to do*.

Desired states and commands are signed by the control plane's control key (Ed25519, distinct
from the manifest key: it steers devices, it cannot make them run a model nobody signed). The
signature covers the canonical JSON of the whole message, including the device and tenant it is
for and its expiry, so a message cannot be replayed to another device, or once it has expired.
Ordering (a replay of an older message) is the caller's check: desired states by their revision,
commands by their counter, both signed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from shared.errors import ControlRejected, SignatureError
from shared.messages import SignedControl, utc_now
from shared.signing import PublicKey, SigningKey
from shared.wire import canonical_json

C = TypeVar("C", bound=SignedControl)

# A retained desired state waits on the broker for devices that are offline; one that expired
# there is re-signed when the device reports the refusal (cloud/plane/service.py).
DEFAULT_DESIRED_TTL_S = 30 * 24 * 3600.0
# A command is for now: one delivered later than this (a device back after days) is refused.
DEFAULT_COMMAND_TTL_S = 300.0
# Device clocks drift; expiry is judged with this much slack.
DEFAULT_MAX_CLOCK_SKEW_S = 300.0


def signed_bytes(message: SignedControl) -> bytes:
    return canonical_json(_signed_fields(message))


def _signed_fields(message: SignedControl) -> dict[str, object]:
    """What a signature covers: the message as JSON without its signature (one definition for
    the signer and the verifier)."""
    data = message.model_dump(mode="json", by_alias=True)
    data.pop("signature", None)
    return data


def sign(
    message: C,
    key: SigningKey,
    *,
    device_id: str,
    tenant: str,
    ttl_s: float,
    now: datetime | None = None,
) -> C:
    """The message for ``device_id`` of ``tenant``, valid for ``ttl_s`` from now, signed."""
    return signed_wire(message, key, device_id=device_id, tenant=tenant, ttl_s=ttl_s, now=now)[0]


def signed_wire(
    message: C,
    key: SigningKey,
    *,
    device_id: str,
    tenant: str,
    ttl_s: float,
    now: datetime | None = None,
) -> tuple[C, bytes]:
    """:func:`sign`'s message and its wire form (``to_json()`` of it), made from one dump: the
    control plane signs and publishes one per device of a rollout, and a copy, a dump and a
    serialization more per message took publishing from 18 % to 22 % of a 10,000-device rollout's
    control-plane samples (py-spy, bench/rollout_scale.py --profile)."""
    issued = now or utc_now()
    data = message.model_dump(mode="json", by_alias=True)
    data.update(
        device_id=device_id,
        tenant=tenant,
        issued_at=issued,
        expires_at=issued + timedelta(seconds=ttl_s),
        signature=None,
    )
    # Validated and dumped again so the signed form is exactly what a receiver parses back.
    bound = type(message).model_validate(data)
    payload = _signed_fields(bound)
    signature = key.signature(canonical_json(payload))
    payload["signature"] = signature.model_dump(mode="json", by_alias=True)
    return bound.model_copy(update={"signature": signature}), canonical_json(payload)


@dataclass(frozen=True)
class ControlSigner:
    """The control plane's half: signs what it publishes for one device of one tenant."""

    key: SigningKey
    desired_ttl_s: float = DEFAULT_DESIRED_TTL_S
    command_ttl_s: float = DEFAULT_COMMAND_TTL_S

    def desired(self, state: C, *, device_id: str, tenant: str) -> C:
        return sign(state, self.key, device_id=device_id, tenant=tenant, ttl_s=self.desired_ttl_s)

    def desired_wire(self, state: C, *, device_id: str, tenant: str) -> tuple[C, bytes]:
        """:meth:`desired` and its wire form."""
        return signed_wire(state, self.key, device_id=device_id, tenant=tenant, ttl_s=self.desired_ttl_s)

    def command(self, command: C, *, device_id: str, tenant: str) -> C:
        return sign(command, self.key, device_id=device_id, tenant=tenant, ttl_s=self.command_ttl_s)


class ControlVerifier:
    """The device's check of a control message: signed by a pinned control key, for this device
    and tenant, not expired. Raises :class:`ControlRejected` with a code for the reported state."""

    def __init__(
        self,
        keys: Iterable[PublicKey],
        *,
        device_id: str,
        tenant: str,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._keys = {k.key_id: k for k in keys}
        if not self._keys:
            raise ValueError("a control verifier needs at least one public key")
        self.device_id = device_id
        self.tenant = tenant
        self.skew = timedelta(seconds=max_clock_skew_s)
        self.clock = clock

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, message: SignedControl) -> None:
        kind = message.kind
        sig = message.signature
        if sig is None:
            raise ControlRejected(f"unsigned {kind} message", code="unsigned")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise ControlRejected(
                f"{kind} message signed by a key this device does not trust",
                code="untrusted_key",
                key_id=sig.key_id,
            )
        try:
            raw = base64.b64decode(sig.value, validate=True)
            key.verify(raw, signed_bytes(message))
        except (binascii.Error, ValueError, SignatureError) as exc:
            raise ControlRejected(
                f"{kind} message altered after signing (signature does not match)",
                code="bad_signature",
                key_id=sig.key_id,
            ) from exc
        if message.device_id != self.device_id or message.tenant != self.tenant:
            raise ControlRejected(
                f"{kind} message is for {message.tenant}/{message.device_id}, not this device",
                code="wrong_device",
            )
        if message.expires_at is None:
            raise ControlRejected(f"{kind} message carries no expiry", code="no_expiry")
        now = self.clock()
        if now > message.expires_at + self.skew:
            raise ControlRejected(
                f"{kind} message expired at {message.expires_at.isoformat()}",
                code="expired",
                now=now.isoformat(),
            )
