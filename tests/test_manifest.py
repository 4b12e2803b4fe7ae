"""Manifests are signed in canonical form; devices refuse unsigned, foreign-key or altered ones."""

from __future__ import annotations

import json

import pytest

from shared.blobs import describe_bytes
from shared.errors import ContractError, IntegrityError, SignatureError
from shared.manifest import FileEntry, SignedManifest, TrustStore
from shared.signing import SigningKey
from shared.wire import canonical_json
from tests.factories import make_manifest


def test_canonical_form_is_stable_and_signature_verifies() -> None:
    key = SigningKey.generate()
    signed = SignedManifest.sign(make_manifest(), key)
    data = signed.to_json()
    assert data == canonical_json(json.loads(data))
    assert TrustStore([key.public]).verify(data, expected_digest=signed.digest) == signed.manifest


def test_every_single_byte_tamper_is_rejected() -> None:
    key = SigningKey.generate()
    data = SignedManifest.sign(make_manifest(), key).to_json()
    doc_start = data.index(b'"manifest":') + len(b'"manifest":')
    trust = TrustStore([key.public])
    rejected = 0
    for i in range(doc_start, data.index(b',"schema"')):
        tampered = bytearray(data)
        tampered[i] = ord("7") if tampered[i] != ord("7") else ord("8")
        with pytest.raises((SignatureError, ContractError)):
            trust.verify(bytes(tampered))
        rejected += 1
    assert rejected > 200


def test_tampered_field_is_a_signature_error() -> None:
    key = SigningKey.generate()
    data = SignedManifest.sign(make_manifest(), key).to_json()
    with pytest.raises(SignatureError, match="does not match"):
        TrustStore([key.public]).verify(data.replace(b'"parameters":1000', b'"parameters":1001'))


def test_wrong_key_is_rejected() -> None:
    data = SignedManifest.sign(make_manifest(), SigningKey.generate()).to_json()
    with pytest.raises(SignatureError, match="untrusted key"):
        TrustStore([SigningKey.generate().public]).verify(data)


def test_forged_key_id_with_wrong_key_is_rejected() -> None:
    trusted, attacker = SigningKey.generate(), SigningKey.generate()
    signed = SignedManifest.sign(make_manifest(), attacker)
    forged = signed.model_copy(
        update={"signature": signed.signature.model_copy(update={"key_id": trusted.public.key_id})}
    )  # type: ignore[union-attr]
    with pytest.raises(SignatureError):
        TrustStore([trusted.public]).verify(forged.to_json())


def test_unsigned_is_rejected() -> None:
    key = SigningKey.generate()
    data = SignedManifest(manifest=make_manifest()).to_json()
    with pytest.raises(SignatureError, match="unsigned"):
        TrustStore([key.public]).verify(data)


def test_pinned_digest_mismatch_is_an_integrity_error() -> None:
    key = SigningKey.generate()
    data = SignedManifest.sign(make_manifest(), key).to_json()
    with pytest.raises(IntegrityError, match="digest mismatch"):
        TrustStore([key.public]).verify(data, expected_digest="sha256:" + "0" * 64)


def test_garbage_is_a_contract_error() -> None:
    with pytest.raises(ContractError):
        TrustStore([SigningKey.generate().public]).verify(b"\x00\x01garbage")


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs/model.onnx", "a/../../b", "a\\b", ""])
def test_file_paths_cannot_escape_the_slot(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        FileEntry(path=path, role="graph", blob=describe_bytes(b"x"))


def test_signing_key_file_round_trip_and_private_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys" / "k.pem"
    key, created = SigningKey.load_or_create(path)
    assert created
    again, created_again = SigningKey.load_or_create(path)
    assert not created_again
    assert again.public == key.public
    assert path.stat().st_mode & 0o777 == 0o600
