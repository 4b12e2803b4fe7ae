"""The model manifest (``autoglm.manifest/v3``): what a rollout ships, signed with Ed25519.

v2 adds the quality figures a real chat model needs judged (perplexity on English prose, greedy
agreement of the shipped graph with fp32 on chat prompts). v3 lets a blob's chunks be cut at
chosen offsets (``BlobRef.ends``: the tensor boundaries of the weights), so a delta update sends
only the tensors that changed; a manifest whose chunks are all fixed-size stays v2, which agents
that know v2 still install. v1 and v2 manifests still verify and load (their canonical bytes,
and so their digests, are unchanged); an agent that knows only v1 or v2 refuses a newer manifest
as an unknown schema rather than misreading it.

A signed manifest travels and is stored as the canonical JSON of :class:`SignedManifest`; its
sha256 is the ``manifest_digest`` that a desired state pins. Devices verify the digest first,
then the signature against the keys they trust.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Final, Literal

from pydantic import Field, field_validator, model_validator

from shared.blobs import DEFAULT_CHUNK_SIZE, BlobRef, digest_of
from shared.errors import ContractError, IntegrityError, SignatureError
from shared.ids import Name
from shared.signing import PublicKey, Signature, SigningKey
from shared.wire import WireDocument, WireModel, canonical_json

SIGNED_MANIFEST_SCHEMA = "autoglm.signed-manifest/v1"
# Signed manifests travel as blobs too, in chunks of this size; only their whole digest is known.
MANIFEST_CHUNK_SIZE = DEFAULT_CHUNK_SIZE
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# The schema a manifest needs once any of its blobs has chunks cut at chosen offsets.
MANIFEST_V3: Final = "autoglm.manifest/v3"


class FileEntry(WireModel):
    """A file of the model folder, stored as one blob."""

    path: str
    role: Literal["graph", "weights", "tokenizer", "config", "eval"]
    blob: BlobRef

    @field_validator("path")
    @classmethod
    def _safe_relative_path(cls, value: str) -> str:
        p = PurePosixPath(value)
        if not value or p.is_absolute() or ".." in p.parts or "\\" in value or value != p.as_posix():
            raise ValueError(f"file path must be a plain relative path, got {value!r}")
        return value


class TensorSpec(WireModel):
    name: str
    dtype: str
    shape: list[int | str]


class IOSignature(WireModel):
    """How to drive the graph: names, KV-cache layout, vocabulary and context length."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_layers: Annotated[int, Field(strict=True, gt=0)]
    num_kv_heads: Annotated[int, Field(strict=True, gt=0)]
    head_dim: Annotated[int, Field(strict=True, gt=0)]
    kv_layout: Literal["batch,kv_heads,seq,head_dim"] = "batch,kv_heads,seq,head_dim"
    # "concat": the graph returns past+new as a fresh tensor each step (optimum exports).
    # "shared": GroupQueryAttention updates a preallocated buffer bound as both past and present.
    kv_cache: Literal["concat", "shared"] = "concat"
    # The graph's past/present type; a fused graph's float16 cache (packager --kv-cache) is read
    # and written by ai.autoglm GroupQueryAttentionHalfKV (cloud/packaging/half_kv.py).
    kv_dtype: Literal["float32", "float16"] = "float32"
    vocab_size: Annotated[int, Field(strict=True, gt=0)]
    context_length: Annotated[int, Field(strict=True, gt=0)]
    eos_token_ids: list[int] = Field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str


class Quantization(WireModel):
    method: Literal["none", "int8-dynamic", "int8-weight-only", "int4-weight-only"]
    weight_type: Literal["float32", "int8", "int4"]


class PerplexityFigures(WireModel):
    """Perplexity of the fp32 export and of the shipped graph on one text."""

    eval_text: str
    eval_tokens: Annotated[int, Field(strict=True, gt=0)]
    perplexity_fp32: float
    perplexity_shipped: float
    relative_change: float


class GreedyAgreement(WireModel):
    """The shipped graph's greedy answers against the fp32 graph's, on the packager's chat prompts."""

    prompts: Annotated[int, Field(strict=True, gt=0)]
    max_new_tokens: Annotated[int, Field(strict=True, gt=0)]
    identical: Annotated[int, Field(strict=True, ge=0)]
    share: float
    # Mean token index at which a differing answer first departs from fp32's (None: all identical).
    mean_first_difference: float | None = None


class QualityReport(WireModel):
    """Perplexity of the fp32 export and of the shipped (quantized) graph on held-out text
    (the ``eval_text`` fields; code unless the packager was given a text), and, from v2, on
    English prose and greedy agreement on chat prompts."""

    eval_text: str
    eval_tokens: Annotated[int, Field(strict=True, gt=0)]
    perplexity_fp32: float
    perplexity_shipped: float
    relative_change: float
    prose: PerplexityFigures | None = None
    greedy: GreedyAgreement | None = None


EVAL_FILE = "eval.json"


class EvalCase(WireModel):
    """One chat prompt (rendered with the model's template and encoded) and the reference
    model's greedy answer to it, as token ids."""

    prompt_ids: Annotated[list[int], Field(min_length=1, max_length=8192)]
    # Short answers: a device computes a logits row per answer token.
    answer_ids: Annotated[list[int], Field(min_length=1, max_length=256)]


class EvalSet(WireModel):
    """The package's evaluation set (file role ``eval``, so signed with the manifest): a device
    runs it on the model it just loaded and reports how often its top choice is the reference's
    next token (teacher-forced), which a rollout's quality gate judges. A new version may carry
    an older version's set, so it is held to the same answers."""

    schema_: Literal["autoglm.eval/v1"] = Field(default="autoglm.eval/v1", alias="schema")
    # The model (name:version, fp32) whose greedy answers these are.
    reference: str
    cases: Annotated[list[EvalCase], Field(min_length=1, max_length=256)]
    # The shipped graph's agreement on the packaging machine: what a healthy device should see.
    expected_agreement: Annotated[float, Field(ge=0.0, le=1.0)]


class ExportValidation(WireModel):
    """How the exported graph compared with PyTorch at packaging time."""

    greedy_tokens_match: bool
    compared_tokens: int
    max_abs_logit_diff: float


class Manifest(WireModel):
    schema_: Literal["autoglm.manifest/v1", "autoglm.manifest/v2", "autoglm.manifest/v3"] = Field(
        default="autoglm.manifest/v2", alias="schema"
    )
    name: Name
    version: Name
    created_at: datetime
    architecture: str
    parameters: Annotated[int, Field(strict=True, ge=0)]
    files: Annotated[list[FileEntry], Field(min_length=1)]
    io: IOSignature
    quantization: Quantization
    validation: ExportValidation | None = None
    quality: QualityReport | None = None
    # Monotonic per model name in a registry (anti-rollback): a device refuses a release lower
    # than the highest it has installed unless a signed desired state authorizes the rollback.
    # Manifests made before release numbers existed have none and count as release 0.
    release: Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)] | None = None

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        return files

    @model_validator(mode="after")
    def _cut_chunks_need_v3(self) -> Manifest:
        if self.schema_ != MANIFEST_V3 and any(f.blob.cut for f in self.files):
            raise ValueError(f"chunks cut at chosen offsets need schema {MANIFEST_V3}")
        return self

    def canonical_bytes(self) -> bytes:
        data = self.model_dump(mode="json", by_alias=True)
        if data["release"] is None:
            del data["release"]  # the bytes older manifests were signed over
        return canonical_json(data)

    @property
    def release_number(self) -> int:
        return self.release or 0

    @property
    def total_size(self) -> int:
        return sum(f.blob.size for f in self.files)

    def blobs(self) -> list[BlobRef]:
        """Distinct blobs (two identical files share one)."""
        seen: dict[str, BlobRef] = {}
        for f in self.files:
            seen.setdefault(f.blob.digest, f.blob)
        return list(seen.values())


class SignedManifest(WireDocument):
    SCHEMA = SIGNED_MANIFEST_SCHEMA
    KIND = "manifest"
    MAX_BYTES = MAX_MANIFEST_BYTES

    manifest: Manifest
    signature: Signature | None = None

    @classmethod
    def sign(cls, manifest: Manifest, key: SigningKey) -> SignedManifest:
        return cls(manifest=manifest, signature=key.signature(manifest.canonical_bytes()))

    @property
    def digest(self) -> str:
        return digest_of(self.to_json())


class TrustStore:
    """The public keys a device accepts manifests from."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys = {k.key_id: k for k in keys}
        if not self._keys:
            raise ContractError("a trust store needs at least one public key")

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, payload: bytes, *, expected_digest: str | None = None) -> Manifest:
        """Check digest (when pinned), schema, signature; return the manifest or raise.

        Raises IntegrityError for a digest mismatch, SignatureError for an unsigned, untrusted or
        altered manifest, ContractError for a payload that is not a signed manifest at all.
        """
        if expected_digest is not None:
            actual = digest_of(payload)
            if actual != expected_digest:
                raise IntegrityError("manifest digest mismatch", expected=expected_digest, actual=actual)
        signed = SignedManifest.from_json(payload)
        m = signed.manifest
        self.check(signed.signature, m.canonical_bytes(), what="manifest", name=m.name, version=m.version)
        return m

    def check(
        self, signature: Signature | None, signed_bytes: bytes, *, what: str, **context: object
    ) -> None:
        """SignatureError unless ``signature`` is a trusted key's over ``signed_bytes``."""
        if signature is None:
            raise SignatureError(f"{what} is unsigned", **context)
        key = self._keys.get(signature.key_id)
        if key is None:
            raise SignatureError(f"{what} signed by an untrusted key", key_id=signature.key_id, **context)
        try:
            sig = base64.b64decode(signature.value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError("signature is not valid base64", key_id=key.key_id) from exc
        key.verify(sig, signed_bytes)
