"""The pool artifact (``autoglm.pool-artifact/v1``): the full-precision model an edge package was
made from, kept beside it in the registry so that the cloud pool serves the same model version.

The packager stores the source folder's files (config, weights, tokenizer, chat template) as blobs
and signs a listing of them with the key that signs the package; the listing names the package's
manifest digest, so the two are bound. Its sha256 is the artifact's digest. A pool replica (or the
init container in front of vLLM) verifies the signature against the keys it trusts and every file
against its digest before it loads anything (cloud/pool/fetch.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator

from shared.blobs import digest_of
from shared.errors import IntegrityError
from shared.ids import Name
from shared.manifest import FileEntry, TrustStore
from shared.signing import Signature, SigningKey
from shared.wire import WireDocument, WireModel, canonical_json

SIGNED_POOL_ARTIFACT_SCHEMA = "autoglm.signed-pool-artifact/v1"
MAX_POOL_ARTIFACT_BYTES = 4 * 1024 * 1024
# The control plane's answer to GET /v1/models/{name}/{version}/pool names the artifact's digest.
POOL_DIGEST_HEADER = "X-AutoGLM-Pool-Digest"


class PoolArtifact(WireModel):
    schema_: Literal["autoglm.pool-artifact/v1"] = Field(default="autoglm.pool-artifact/v1", alias="schema")
    name: Name
    version: Name
    created_at: datetime
    architecture: str
    # The source's own precision (its config's torch_dtype): what "full precision" means for it.
    torch_dtype: str | None = None
    # The signed manifest of the edge package made from these weights.
    package_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    files: Annotated[list[FileEntry], Field(min_length=1)]

    @field_validator("files")
    @classmethod
    def _a_model_folder(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        if "config.json" not in paths:
            raise ValueError("a pool artifact needs the model's config.json")
        if not any(f.role == "weights" for f in files):
            raise ValueError("a pool artifact needs the model's weights")
        return files

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def total_size(self) -> int:
        return sum(f.blob.size for f in self.files)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True))


class SignedPoolArtifact(WireDocument):
    SCHEMA = SIGNED_POOL_ARTIFACT_SCHEMA
    KIND = "pool-artifact"
    MAX_BYTES = MAX_POOL_ARTIFACT_BYTES

    artifact: PoolArtifact
    signature: Signature | None = None

    @classmethod
    def sign(cls, artifact: PoolArtifact, key: SigningKey) -> SignedPoolArtifact:
        return cls(artifact=artifact, signature=key.signature(artifact.canonical_bytes()))

    @property
    def digest(self) -> str:
        return digest_of(self.to_json())


def verify_pool_artifact(
    payload: bytes, trust: TrustStore, *, expected_digest: str | None = None
) -> PoolArtifact:
    """Check digest (when pinned), schema and signature; the artifact, or IntegrityError,
    SignatureError or ContractError saying why not."""
    if expected_digest is not None and (actual := digest_of(payload)) != expected_digest:
        raise IntegrityError("pool artifact digest mismatch", expected=expected_digest, actual=actual)
    signed = SignedPoolArtifact.from_json(payload)
    a = signed.artifact
    trust.check(signed.signature, a.canonical_bytes(), what=f"pool artifact {a.ref}")
    return a
