"""GGUF file → Hugging Face model folder (weights, tokenizer, chat template, generation config).

llama.cpp's GGUF files carry the weights (often quantized), the tokenizer and the chat template in
one file. transformers reads them (``from_pretrained(folder, gguf_file=...)`` with the ``gguf``
package) and dequantizes the weights to float32; we save the result as an ordinary folder that
``autoglm model package`` (and the pool) take like any other.

Two things the conversion gets wrong for chat models are put right here, because the package and
the pool both read this folder and must end a turn where the model does:
- the converted tokenizer may name the same token as BOS and EOS (SmolLM2: ``<|im_start|>``) while
  the generation config ends the turn with another (``<|im_end|>``); the tokenizer's EOS is set to
  the generation config's;
- ``clean_up_tokenization_spaces`` is switched off, so transformers decodes exactly as the
  ``tokenizers`` library the edge uses does (no space removed before punctuation).

The folder is built beside its destination and renamed into place, so an interrupted import never
leaves a half folder that looks finished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.packaging.progress import SilentReporter, StepReporter
from shared.errors import PackagingError

GGUF_MAGIC = b"GGUF"
# GGUF architectures transformers can load that the packager can also export (general.architecture).
IMPORTABLE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@dataclass(frozen=True)
class GgufImport:
    """What an import produced."""

    folder: Path
    architecture: str
    model_name: str
    parameters: int
    seconds: float


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header's key/value fields (no tensor data); PackagingError for a bad file."""
    if not path.is_file():
        raise PackagingError("GGUF file not found", path=str(path))
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise PackagingError("not a GGUF file (wrong magic bytes)", path=str(path))
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - the cloud extra installs it
        raise PackagingError("reading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on damaged files
        raise PackagingError(f"the GGUF file is damaged or truncated: {exc}", path=str(path)) from exc
    fields: dict[str, Any] = {}
    for name in ("general.architecture", "general.name"):
        field = reader.fields.get(name)
        if field is not None:
            fields[name] = field.contents()
    fields["tensor_count"] = len(reader.tensors)
    fields["parameters"] = int(sum(int(t.n_elements) for t in reader.tensors))
    return fields


def import_gguf(path: Path, out: Path, reporter: StepReporter | None = None) -> GgufImport:
    """Write a Hugging Face folder for the model in ``path`` to ``out`` (which must not exist)."""
    r = reporter or SilentReporter()
    if out.exists():
        raise PackagingError("output folder already exists; choose a new one", out=str(out))
    started = time.monotonic()
    r.step(f"Reading the GGUF header of {path.name}")
    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    if arch not in IMPORTABLE_ARCHITECTURES:
        raise PackagingError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(IMPORTABLE_ARCHITECTURES)}",
            path=str(path),
        )
    name = str(meta.get("general.name") or path.stem)
    r.done(f"{arch}, {name!r}, {meta['tensor_count']} tensors, {meta['parameters'] / 1e6:.1f} M parameters")

    # A folder of this import's own beside ``out``, renamed into place when whole: a fixed name
    # ("out.importing") was removed from under another import of the same name, and a Ctrl-C
    # (not an Exception) left it behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.importing-"))
    r.step("Dequantizing the weights to float32 and converting the tokenizer (transformers)")
    try:
        try:
            _convert(path, building)
        except PackagingError:
            raise
        except Exception as exc:  # transformers raises many types for files it cannot read
            raise PackagingError(f"transformers could not load the GGUF file: {exc}", path=str(path)) from exc
        fixes = _align_tokenizer_config(building)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when it became ``out``
    seconds = time.monotonic() - started
    r.done(f"{out} ({', '.join(sorted(p.name for p in out.iterdir()))}){'; ' + fixes if fixes else ''}")
    return GgufImport(out, arch, name, meta["parameters"], seconds)


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, local_files_only=True
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise PackagingError("the GGUF tokenizer could not be converted to tokenizer.json", path=str(path))


def _align_tokenizer_config(folder: Path) -> str:
    """Make the tokenizer's EOS the generation config's end-of-turn token; returns what changed."""
    cfg_path = folder / "tokenizer_config.json"
    gen_path = folder / "generation_config.json"
    if not cfg_path.is_file():
        return ""
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    changes: list[str] = []
    gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen_eos = gen.get("eos_token_id")
    gen_eos_id = gen_eos if isinstance(gen_eos, int) else (gen_eos[0] if gen_eos else None)
    if isinstance(gen_eos_id, int):
        token = _token_for_id(folder, gen_eos_id)
        if token is not None and cfg.get("eos_token") != token:
            changes.append(f"tokenizer EOS {cfg.get('eos_token')!r} → {token!r} (the generation config's)")
            cfg["eos_token"] = token
            if "eos_token_id" in cfg:
                cfg["eos_token_id"] = gen_eos_id
    if cfg.get("clean_up_tokenization_spaces"):
        cfg["clean_up_tokenization_spaces"] = False
        changes.append("clean_up_tokenization_spaces off")
    if changes:
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        smap = folder / "special_tokens_map.json"
        if smap.is_file() and "eos_token" in cfg:
            special = json.loads(smap.read_text())
            special["eos_token"] = cfg["eos_token"]
            smap.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return "; ".join(changes)


def _token_for_id(folder: Path, token_id: int) -> str | None:
    from tokenizers import Tokenizer

    token: str | None = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(token_id)
    return token
