"""``autoglm model package``: export → validate → quantize → measure → blobs → signed manifest."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from cloud.packaging.corpus import heldout_text
from cloud.packaging.export import (
    GRAPH_FILE,
    export_onnx,
    io_signature,
    parameter_count,
    read_hf_config,
    validate_export,
)
from cloud.packaging.fused import FUSED_MODEL_TYPES, UnsupportedArchitecture, build_fused
from cloud.packaging.half_kv import half_kv_file
from cloud.packaging.layout import tensor_cuts
from cloud.packaging.nbits_fusion import fuse_file
from cloud.packaging.progress import SilentReporter, StepReporter
from cloud.packaging.quality import (
    CHAT_PROMPTS,
    GraphPair,
    evaluation_set,
    fp32_answers,
    greedy_agreement,
    perplexity_figures,
    prose_text,
)
from cloud.packaging.quantize import WEIGHT_BITS, quantization_record, quantize_weight_only, weight_block_size
from cloud.registry import ModelRegistry, PoolEntry, RegistryEntry
from edge_agent.runtime.chat import ChatTemplate, end_of_turn_ids
from shared.blobs import DEFAULT_CHUNK_SIZE, describe_file
from shared.errors import PackagingError, RegistryError
from shared.manifest import (
    EVAL_FILE,
    MANIFEST_V3,
    EvalSet,
    FileEntry,
    IOSignature,
    Manifest,
    QualityReport,
    SignedManifest,
)
from shared.pool_artifact import PoolArtifact, SignedPoolArtifact
from shared.signing import SigningKey

log = logging.getLogger(__name__)

# Files an edge runtime needs besides the graph (everything chat needs: the tokenizer, its special
# tokens, the chat template and the generation config); anything else in the export folder stays behind.
_SIDE_FILES: dict[str, Literal["tokenizer", "config"]] = {
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer",
    "special_tokens_map.json": "tokenizer",
    "chat_template.jinja": "tokenizer",
    "config.json": "config",
    "generation_config.json": "config",
}
# Copied from the source folder over whatever the exporter wrote: the source is the truth.
_SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EVAL_TOKENS = 4096
VALIDATION_PROMPT = "def main():\n    "


@dataclass(frozen=True)
class PackageOptions:
    name: str
    version: str
    quantize: str = "int8"
    # "auto": the fused graph for the architectures it covers (fused.py), optimum's export otherwise.
    graph: Literal["auto", "fused", "generic"] = "auto"
    eval_text: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # "tensors": weights files are cut where their tensors start and end (pieces no longer than
    # chunk_size), so a delta update sends only the changed tensors (manifest v3); "fixed": every
    # chunk_size bytes (a manifest v2 that agents older than v3 manifests still install).
    chunking: Literal["tensors", "fixed"] = "tensors"
    # Refuse to ship an export whose greedy tokens differ from PyTorch's.
    require_token_match: bool = True
    # Refuse to ship a quantized graph whose perplexity rose by more than this fraction.
    max_perplexity_increase: float = 0.05
    # The evaluation set to carry (an earlier version's, say); None: made from this model's fp32
    # greedy answers.
    eval_set: EvalSet | None = None
    # Keep the full-precision source beside the package for the cloud pool (shared/pool_artifact.py).
    pool_artifact: bool = True
    # The shipped graph's KV cache (half_kv.py): "float16" halves its memory and reads (a 4-row
    # SmolLM2 step 1.12-1.16x faster on the edge's kernels, slower on onnxruntime's own: see
    # docs/deploy.md), "float32" keeps it exact; "auto":
    # float16 for quantized weights, float32 for an unquantized package (the reference). Fused
    # graphs only: a generic export keeps float (refused when float16 is asked for by name).
    kv_cache: Literal["auto", "float32", "float16"] = "auto"


class ModelPackager:
    def __init__(
        self, registry: ModelRegistry, key: SigningKey, reporter: StepReporter | None = None
    ) -> None:
        self.registry = registry
        self.key = key
        self.reporter = reporter or SilentReporter()

    def package(self, src: Path, opts: PackageOptions) -> RegistryEntry:
        quant = quantization_record(opts.quantize)
        if opts.kv_cache not in ("auto", "float32", "float16"):
            raise PackagingError("kv_cache must be auto, float32 or float16", kv_cache=opts.kv_cache)
        if self.registry.exists(opts.name, opts.version):
            raise RegistryError(
                "model version already exists; pick a new version", name=opts.name, version=opts.version
            )
        limit = opts.max_perplexity_increase
        if not math.isfinite(limit) or limit < 0:
            # NaN compared false with every rise: it turned the quality check off without a word.
            raise PackagingError("max_perplexity_increase must be a finite number, 0 or more", limit=limit)
        cfg = read_hf_config(src)
        with tempfile.TemporaryDirectory(prefix="autoglm-package-") as tmp:
            work = Path(tmp)
            r = self.reporter
            fp32_dir = work / "fp32"
            graph = self._export(src, cfg, fp32_dir, opts.graph)
            _copy_tokenizer_files(src, fp32_dir)
            gen_cfg = _read_json(fp32_dir / "generation_config.json")
            tokenizer = _load_tokenizer(fp32_dir)
            template = ChatTemplate.from_folder(fp32_dir)
            io = io_signature(graph, cfg, gen_cfg)
            io = io.model_copy(
                update={"eos_token_ids": end_of_turn_ids(io.eos_token_ids, tokenizer, template)}
            )
            tokens = tokenizer.get_vocab_size(with_added_tokens=True)
            if tokens > io.vocab_size:
                # Ids past the embedding's rows: onnxruntime's "out of bounds" mid-validation.
                raise PackagingError(
                    f"the tokenizer has {tokens} tokens, the model's vocabulary {io.vocab_size}: "
                    "they do not belong together",
                    src=str(src),
                )
            r.done(
                f"{io.num_layers} layers, {io.num_kv_heads} KV heads × {io.head_dim}, vocab {io.vocab_size}; "
                f"chat template: {template.source}; end-of-turn ids {io.eos_token_ids}"
            )

            r.step("Validating the ONNX graph against PyTorch (greedy tokens)")
            prompt_ids = tokenizer.encode(VALIDATION_PROMPT).ids or [0]
            validation = validate_export(src, graph, io, prompt_ids)
            if opts.require_token_match and not validation.greedy_tokens_match:
                raise PackagingError(
                    "exported graph's greedy tokens differ from PyTorch's",
                    max_abs_logit_diff=validation.max_abs_logit_diff,
                )
            r.done(
                f"{validation.compared_tokens} tokens match; max |Δlogit| {validation.max_abs_logit_diff:.2e}"
            )

            ship_dir = fp32_dir
            if opts.quantize in WEIGHT_BITS:
                bits = WEIGHT_BITS[opts.quantize]
                block = weight_block_size(bits, int(cfg.get("hidden_size") or 256))
                r.step(f"Quantizing weights to {opts.quantize} (weight-only, blocks of {block}, MatMulNBits)")
                ship_dir = work / opts.quantize
                ship_dir.mkdir()
                quantize_weight_only(graph, ship_dir / GRAPH_FILE, bits, block)
                for fname in _SIDE_FILES:
                    if (fp32_dir / fname).is_file():
                        shutil.copy2(fp32_dir / fname, ship_dir / fname)
                r.done(f"{_graph_bytes(fp32_dir) / 1e6:.1f} MB → {_graph_bytes(ship_dir) / 1e6:.1f} MB")
            else:
                ship_dir = self._fuse_float(fp32_dir, work)

            # Quantized weights or a half cache change the numbers: the shipped answers are
            # compared with fp32's (the float ops only sum in another order).
            lossy = opts.quantize in WEIGHT_BITS
            if opts.kv_cache == "float16" or (opts.kv_cache == "auto" and opts.quantize in WEIGHT_BITS):
                half = self._half_kv(fp32_dir, ship_dir, work, opts)
                if half is not None:  # the manifest describes the shipped graph's tensors
                    ship_dir, lossy = half, True
                    shipped = io_signature(ship_dir / GRAPH_FILE, cfg, gen_cfg)
                    io = shipped.model_copy(update={"eos_token_ids": io.eos_token_ids})

            quality = self._quality(fp32_dir, ship_dir, io, tokenizer, template, opts, lossy)
            if quality.relative_change > opts.max_perplexity_increase:
                raise PackagingError(
                    f"quantized perplexity rose {quality.relative_change:.1%}, over the "
                    f"{opts.max_perplexity_increase:.0%} limit",
                    name=opts.name,
                )

            how = "cut at tensor boundaries, " if opts.chunking == "tensors" else ""
            r.step(
                f"Splitting files into content-addressed blobs ({how}chunks of at most {opts.chunk_size // 1024} KiB)"
            )
            files = self._store_files(ship_dir, opts.chunk_size, opts.chunking)
            blobs = len({f.blob.digest for f in files})
            chunks = sum(f.blob.chunk_count for f in files)
            r.done(
                f"{len(files)} files, {sum(f.blob.size for f in files) / 1e6:.1f} MB, {blobs} blobs, {chunks} chunks"
            )

            r.step("Signing the manifest (Ed25519) and publishing it to the registry")
            schema: Literal["autoglm.manifest/v2", "autoglm.manifest/v3"] = "autoglm.manifest/v2"
            if any(f.blob.cut for f in files):
                schema = MANIFEST_V3
            manifest = Manifest(
                schema=schema,
                name=opts.name,
                version=opts.version,
                created_at=datetime.now(UTC),
                architecture=str((cfg.get("architectures") or [cfg["model_type"]])[0]),
                parameters=parameter_count(src),
                files=files,
                io=io,
                quantization=quant,
                validation=validation,
                quality=quality,
                release=self.registry.next_release(opts.name),
            )
            pool_files = self._store_source(src, opts.chunk_size) if opts.pool_artifact else None
            entry = self.registry.publish(SignedManifest.sign(manifest, self.key))
            r.done(
                f"{entry.name}:{entry.version} release {manifest.release} {entry.digest} "
                f"(key {self.key.public.key_id})"
            )
            if pool_files is not None:
                self._publish_pool(entry, cfg, pool_files)
            return entry

    def attach_source(
        self, name: str, version: str, src: Path, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> PoolEntry:
        """Give a version packaged without one (before pool artifacts existed, or with
        ``--no-pool-artifact``) its pool artifact: ``src`` must be the model it was made from
        (same architecture and parameter count)."""
        entry = self.registry.get(name, version)
        if self.registry.pool_digest(name, version) is not None:
            raise RegistryError("this version already has a pool artifact", name=name, version=version)
        cfg = read_hf_config(src)
        architecture = str((cfg.get("architectures") or [cfg["model_type"]])[0])
        if architecture != entry.manifest.architecture:
            raise PackagingError(
                f"{src} is a {architecture}, {name}:{version} a {entry.manifest.architecture}",
                name=name,
                version=version,
            )
        params = parameter_count(src)
        if params and entry.manifest.parameters and params != entry.manifest.parameters:
            raise PackagingError(
                f"{src} has {params} parameters, {name}:{version} {entry.manifest.parameters}: "
                "not the model it was made from",
                name=name,
                version=version,
            )
        files = self._store_source(src, chunk_size)
        if files is None:
            raise PackagingError(f"{src} holds no Hugging Face weights and config.json", src=str(src))
        return self._publish_pool(entry, cfg, files)

    def _publish_pool(self, entry: RegistryEntry, cfg: dict[str, Any], files: list[FileEntry]) -> PoolEntry:
        artifact = PoolArtifact(
            name=entry.name,
            version=entry.version,
            created_at=datetime.now(UTC),
            architecture=entry.manifest.architecture,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "") or None,
            package_digest=entry.digest,
            files=files,
        )
        pool = self.registry.publish_pool(SignedPoolArtifact.sign(artifact, self.key))
        self.reporter.done(
            f"pool artifact {pool.digest} ({artifact.total_size / 1e6:.1f} MB, full precision)"
        )
        return pool

    def _store_source(self, src: Path, chunk_size: int) -> list[FileEntry] | None:
        """The source folder's model files as blobs: what the cloud pool loads for this version."""
        self.reporter.step("Keeping the full-precision source for the cloud pool (pool artifact)")
        chosen = [(p, role) for p in sorted(src.iterdir()) if p.is_file() and (role := _source_role(p.name))]
        if not any(role == "weights" for _, role in chosen) or not (src / "config.json").is_file():
            self.reporter.done("no Hugging Face weights in the source folder: no pool artifact")
            return None
        entries: list[FileEntry] = []
        for path, role in chosen:
            blob = describe_file(path, chunk_size)
            if self.registry.blobs.put_file(path) != blob.digest:
                raise PackagingError("file changed while being packaged", path=str(path))
            entries.append(FileEntry(path=path.name, role=role, blob=blob))
        self.reporter.done(f"{len(entries)} files, {sum(e.blob.size for e in entries) / 1e6:.1f} MB")
        return entries

    def _export(
        self, src: Path, cfg: dict[str, Any], out: Path, kind: Literal["auto", "fused", "generic"]
    ) -> Path:
        """The fp32 graph: fused where the builder covers the model exactly (``auto``: else the
        generic export, said out loud), optimum's export for ``generic``."""
        r = self.reporter
        if kind == "fused" or (kind == "auto" and cfg.get("model_type") in FUSED_MODEL_TYPES):
            r.step(f"Building the fused ONNX decoder for {src} ({cfg['model_type']}, shared KV cache)")
            try:
                graph = build_fused(src, cfg, out)
            except UnsupportedArchitecture as exc:
                if kind == "fused":
                    raise
                r.done(f"not covered by the fused builder ({exc}); using the generic export")
                shutil.rmtree(out, ignore_errors=True)
            else:
                shutil.copy2(src / "config.json", out / "config.json")
                _copy_generation_config(src, out)
                return graph
        r.step(f"Exporting {src} ({cfg['model_type']}) to ONNX with KV cache")
        return export_onnx(src, out)

    def _fuse_float(self, fp32_dir: Path, work: Path) -> Path:
        """The unquantized graph with its matmuls as the edge's float ops (nbits_fusion.py: the
        norms and the gated MLP folded in, functions onnxruntime inlines elsewhere), in a copy of
        fp32_dir (weights hard-linked); fp32_dir itself where nothing was fused."""
        r = self.reporter
        r.step("Folding the layers' norms and activations into the float matmuls (ai.autoglm functions)")
        target = work / "fp32-fused"
        counts = fuse_file(fp32_dir / GRAPH_FILE, _linked_copy(fp32_dir, target))
        if not any(counts.values()):
            shutil.rmtree(target)
            r.done("no float matmul with constant weights: the graph ships as exported")
            return fp32_dir
        r.done(", ".join(f"{n} {op}" for op, n in counts.items() if n))
        return target

    def _half_kv(self, fp32_dir: Path, ship_dir: Path, work: Path, opts: PackageOptions) -> Path | None:
        """The shipped graph with a float16 KV cache (its folder: ship_dir, or for an unquantized
        package a copy of the fp32 one, weights hard-linked); None where the graph has no
        GroupQueryAttention and keeps its float cache."""
        r = self.reporter
        r.step("Keeping the KV cache in half precision (GroupQueryAttentionHalfKV)")
        target = ship_dir
        if ship_dir == fp32_dir:
            target = work / "fp32-half-kv"
            _linked_copy(fp32_dir, target)
        changed = half_kv_file(ship_dir / GRAPH_FILE, target / GRAPH_FILE)
        if changed == 0:
            if target != ship_dir:
                shutil.rmtree(target)
            if opts.kv_cache == "float16":
                raise PackagingError(
                    "a float16 KV cache needs the fused graph (its attention is GroupQueryAttention); "
                    "this export has none: package with --graph fused or --kv-cache float32",
                    name=opts.name,
                )
            r.done("not a fused graph: the KV cache stays float32")
            return None
        r.done(f"{changed} attention nodes; the KV cache is float16 (half the memory and reads)")
        return target

    def _quality(
        self,
        fp32_dir: Path,
        ship_dir: Path,
        io: IOSignature,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        opts: PackageOptions,
        lossy: bool,
    ) -> QualityReport:
        r = self.reporter
        pair = GraphPair(fp32_dir / GRAPH_FILE, ship_dir / GRAPH_FILE, io, tokenizer)
        text = opts.eval_text if opts.eval_text is not None else heldout_text()
        source = "user-supplied" if opts.eval_text is not None else "python-stdlib-heldout"
        r.step("Measuring perplexity on held-out text and on English prose")
        main = perplexity_figures(pair, text, source, EVAL_TOKENS)
        prose = perplexity_figures(pair, prose_text(), "python-reference-prose", EVAL_TOKENS)
        r.done(
            f"{source}: fp32 {main.perplexity_fp32:.3f}, shipped {main.perplexity_shipped:.3f} "
            f"({main.relative_change:+.2%}) over {main.eval_tokens} tokens; prose: fp32 "
            f"{prose.perplexity_fp32:.3f}, shipped {prose.perplexity_shipped:.3f} ({prose.relative_change:+.2%})"
        )
        r.step(f"Answering the chat prompts with the fp32 graph ({len(CHAT_PROMPTS)} prompts, greedy)")
        answers = fp32_answers(pair, template)
        evaluation, measured = evaluation_set(
            pair, template, f"{opts.name}:{opts.version}", answers, opts.eval_set
        )
        (ship_dir / EVAL_FILE).write_text(evaluation.model_dump_json(by_alias=True))
        below = evaluation.expected_agreement - measured
        r.done(
            f"evaluation set: {len(evaluation.cases)} answers by {evaluation.reference}; the shipped graph "
            f"agrees on {measured:.1%} of their tokens (teacher-forced; the set's bar is "
            f"{evaluation.expected_agreement:.1%})"
            + (
                f" — {below:.1%} below it: rollouts' quality gate will stop this package"
                if below > 0.05
                else ""
            )
        )
        greedy = None
        if lossy:
            r.step(f"Comparing greedy chat answers with fp32 ({len(CHAT_PROMPTS)} prompts)")
            greedy = greedy_agreement(pair, template, answers)
            departs = (
                f"; the others depart at token {greedy.mean_first_difference:.1f} on average"
                if greedy.mean_first_difference is not None
                else ""
            )
            r.done(f"{greedy.identical}/{greedy.prompts} answers identical ({greedy.share:.0%}){departs}")
        return QualityReport(**main.model_dump(), prose=prose, greedy=greedy)

    def _store_files(
        self, ship_dir: Path, chunk_size: int, chunking: Literal["tensors", "fixed"] = "tensors"
    ) -> list[FileEntry]:
        cuts = tensor_cuts(sorted(ship_dir.glob("*.onnx"))) if chunking == "tensors" else {}
        entries: list[FileEntry] = []
        for path in sorted(ship_dir.iterdir()):
            if path.name == GRAPH_FILE:
                role: Literal["graph", "weights", "tokenizer", "config", "eval"] = "graph"
            elif path.name.startswith(GRAPH_FILE) or path.suffix == ".onnx_data" or path.suffix == ".data":
                role = "weights"
            elif path.name in _SIDE_FILES:
                role = _SIDE_FILES[path.name]
            elif path.name == EVAL_FILE:
                role = "eval"
            else:
                continue
            blob = describe_file(path, chunk_size, cuts.get(path.name, ()))
            stored = self.registry.blobs.put_file(path)
            if stored != blob.digest:
                raise PackagingError("file changed while being packaged", path=str(path))
            entries.append(FileEntry(path=path.name, role=role, blob=blob))
        return entries


_SOURCE_CONFIG = frozenset({"config.json", "generation_config.json"})
# What a server loads beside the weights: the tokenizer in any of its forms, and the processor
# configuration of multimodal models. Remote code (*.py) is left out: the pool does not run it.
_SOURCE_TOKENIZER = frozenset(
    {
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.tiktoken",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
    }
)


def _linked_copy(folder: Path, target: Path) -> Path:
    """``folder`` copied to ``target`` with its files hard-linked, all but the graph, which the
    caller writes there anew (never through ``folder``'s link); returns that graph's path."""
    shutil.copytree(folder, target, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(GRAPH_FILE))
    return target / GRAPH_FILE


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _source_role(name: str) -> Literal["weights", "tokenizer", "config"] | None:
    """A source file's part in the pool artifact; None for what a server does not load (READMEs,
    a GGUF, images)."""
    if name in _SOURCE_CONFIG:
        return "config"
    if name in _SOURCE_TOKENIZER:
        return "tokenizer"
    if name.endswith((".safetensors", ".safetensors.index.json")) or (
        name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))
    ):
        return "weights"
    return None


def _copy_generation_config(src: Path, out: Path) -> None:
    """What optimum's export writes beside the graph; the fused builder needs the same file."""
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
    except OSError:
        GenerationConfig.from_model_config(_load_config(src)).save_pretrained(str(out))


def _load_config(src: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src), local_files_only=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _graph_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def _copy_tokenizer_files(src: Path, out: Path) -> None:
    """The tokenizer, its special tokens and the chat template, as the source folder has them.

    The edge reads tokenizer.json (the ``tokenizers`` library, no transformers); a model that ships
    only a slow tokenizer is converted once here."""
    for name in _SOURCE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (out / "tokenizer.json").is_file():
        return
    try:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="autoglm-tokenizer-") as tmp:
            AutoTokenizer.from_pretrained(str(src), use_fast=True, local_files_only=True).save_pretrained(tmp)
            for name in _SOURCE_FILES:
                if (Path(tmp) / name).is_file() and not (out / name).is_file():
                    shutil.copy2(Path(tmp) / name, out / name)
    except Exception as exc:
        raise PackagingError(f"no usable tokenizer in the model folder: {exc}", src=str(src)) from exc
    if not (out / "tokenizer.json").is_file():
        raise PackagingError("the model's tokenizer cannot be converted to tokenizer.json", src=str(src))


def _load_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
        raise PackagingError(f"tokenizer.json cannot be read: {exc}", src=str(folder)) from exc
