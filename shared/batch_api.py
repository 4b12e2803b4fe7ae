"""Wire schemas of OpenAI's Files and Batch APIs, as the edge's local API serves them.

The shapes are OpenAI's, so the official ``openai`` client works unchanged: a file object, a
batch object, the input lines of a batch file and the output/error lines of its results. Requests
tolerate unknown fields (clients send more than we read); answers are ours and exact. One
extension: an output line's ``response.served_by`` says where the request was served
(``local`` or ``cloud``), as ``X-AutoGLM-Served-By`` does for a single request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# What a batch may call: the endpoints this API serves one request at a time.
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions"]
BATCH_ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")
# OpenAI's only completion window; a batch not finished within it is expired.
COMPLETION_WINDOWS: dict[str, int] = {"24h": 24 * 3600}
# OpenAI's limit on requests in one batch file.
MAX_BATCH_LINES = 50_000

FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- files ----------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    expires_at: int | None = None
    # Deprecated by OpenAI, still required by its client's model.
    status: Literal["uploaded", "processed", "error"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# -- batches --------------------------------------------------------------------------------------
def _bounded_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("at most 16 metadata pairs")
    for key, text in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata key {key[:20]!r}… is longer than 64 characters")
        if len(text) > 512:
            raise ValueError(f"metadata value of {key!r} is longer than 512 characters")
    return value


class BatchCreateRequest(_Tolerant):
    input_file_id: Annotated[str, Field(min_length=1, max_length=128, strict=True)]
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(strict=True)]] | None = None

    _valid_metadata = field_validator("metadata")(_bounded_metadata)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# -- the lines of batch files ---------------------------------------------------------------------
class BatchInputLine(_Tolerant):
    """One request of a batch input file."""

    custom_id: Annotated[str, Field(min_length=1, max_length=512, strict=True)]
    method: Literal["POST"]
    url: BatchEndpoint
    body: dict[str, Any]


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]
    # Ours: "local" or "cloud" (OpenAI's lines have no such field; clients ignore it).
    served_by: str | None = None


class BatchLineError(BaseModel):
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """One line of a batch's output file (answered requests) or error file (the rest)."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchLineError | None
