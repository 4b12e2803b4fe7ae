"""Settings of one pool replica (``autoglm pool serve``), validated before the model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.serving.body_limit import DEFAULT_MAX_BODY_BYTES
from shared.config_env import validation_problems
from shared.errors import ConfigError
from shared.ids import is_valid_name


class PoolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A local Hugging Face causal-LM folder (config.json, weights, tokenizer).
    model_dir: Path
    # The model id clients use; the folder name when not given.
    name: str | None = None
    # The registry version served: the replica then also answers to "name:version" (and says so
    # in /v1/models), so the gateway can route by version.
    version: str | None = None
    # The digest of the pool artifact the folder was fetched from ('' for a hand-filled folder).
    digest: str = ""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8500
    # auto: CUDA (bf16) when torch sees a GPU, else CPU (fp32).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Sequences decoded together in one step; more wait in the queue.
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    # Requests allowed to wait for a place in the batch; beyond it the answer is 429.
    queue_size: Annotated[int, Field(ge=0, le=100_000)] = 256
    # torch intra-op threads on CPU; 0 leaves torch's default.
    threads: Annotated[int, Field(ge=0, le=1024)] = 0
    # When a request gives no max_tokens (a request may ask for up to the model's context).
    default_max_tokens: Annotated[int, Field(ge=1, le=32768)] = 128
    # When set, every /v1 request must carry ``Authorization: Bearer <api_key>`` (the gateway's).
    api_key: str | None = None
    # Larger request bodies are refused with 413 before they are read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = DEFAULT_MAX_BODY_BYTES

    @field_validator("model_dir")
    @classmethod
    def _is_model_folder(cls, folder: Path) -> Path:
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
        return folder

    @field_validator("name", "version")
    @classmethod
    def _valid_name(cls, name: str | None) -> str | None:
        if name is not None and not is_valid_name(name):
            raise ValueError(f"invalid model name or version {name!r}")
        return name

    @classmethod
    def build(cls, **values: object) -> PoolSettings:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid pool settings: {validation_problems(exc)}") from exc
