"""Ed25519 keys: the cloud signs manifests, devices pin the public keys they trust."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ConfigError, SignatureError
from shared.wire import WireModel

log = logging.getLogger(__name__)


def key_id_of(public_raw: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class Signature(WireModel):
    """An Ed25519 signature over a document's canonical JSON (without this field)."""

    alg: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @functools.cached_property
    def key_id(self) -> str:
        # Cached: the cloud names its key in every signed message (a sha256 each time was 1 % of a
        # 10,000-device rollout's control-plane CPU).
        return key_id_of(self.raw)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("trusted key is not valid base64", key=text[:16]) from exc
        if len(raw) != 32:
            raise ConfigError(f"trusted key must be 32 raw Ed25519 bytes, got {len(raw)}", key=text[:16])
        return cls(raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError("signature does not match the signed content", key_id=self.key_id) from exc


class SigningKey:
    """A private Ed25519 key held by the cloud's registry."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise ConfigError("signing key file not found", path=str(path)) from exc
        except OSError as exc:  # a directory, no permission
            raise ConfigError(f"signing key file cannot be read: {exc.strerror}", path=str(path)) from exc
        except ValueError as exc:
            raise ConfigError("signing key file is not a PEM private key", path=str(path)) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("signing key is not Ed25519", path=str(path))
        _warn_if_exposed(path)
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[SigningKey, bool]:
        """Load the key, or create it (mode 0600) if the file does not exist; says which."""
        if path.exists():
            return cls.load(path), False
        key = cls.generate()
        key.save(path)
        return key, True

    def save(self, path: Path) -> None:
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    @functools.cached_property
    def public(self) -> PublicKey:
        # Cached: the private key never changes, and every signature names it.
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def signature(self, message: bytes) -> Signature:
        """The signature of ``message`` as documents carry it."""
        value = base64.b64encode(self.sign(message)).decode("ascii")
        return Signature(key_id=self.public.key_id, value=value)


def _warn_if_exposed(path: Path) -> None:
    """Warn when any user may read a private key. Group bits pass: the manifests mount the keys
    0440 so that the pod's fsGroup, not root, reads them. A warning, not a refusal: a Secret
    mounted without ``defaultMode`` is 0644, and inside its pod nobody else reads it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:  # read a moment ago; gone now is not this check's business
        return
    if mode & 0o007:
        log.warning(
            "the private key %s can be read by any user (mode %04o): anyone who reads it can sign "
            "for this cloud; chmod 600 it",
            path,
            mode,
        )
