"""GGUF import: clear errors for what it cannot read (the real file is imported by the
``smollm2_source`` fixture and checked in test_real_model.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.packaging.gguf_import import import_gguf, read_gguf_metadata
from shared.errors import PackagingError


def _write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_of_a_valid_file(tmp_path: Path) -> None:
    meta = read_gguf_metadata(_write_gguf(tmp_path / "m.gguf", "llama"))
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny"
    assert meta["tensor_count"] == 1 and meta["parameters"] == 32


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(PackagingError, match="not a GGUF file"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_reported_as_damaged(tmp_path: Path) -> None:
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(PackagingError, match="damaged or truncated"):
        import_gguf(cut, tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(PackagingError, match=r"architecture 'bert' is not supported; supported: llama"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*importing*"))


def test_a_file_transformers_cannot_convert_leaves_nothing_and_spares_other_imports(tmp_path: Path) -> None:
    """A llama GGUF with no model in it passes the header check and fails the conversion; the
    half-built folder goes, and a folder another import was building under the old fixed name
    ("out.importing") is no longer removed."""
    path = _write_gguf(tmp_path / "empty.gguf", "llama")
    other = tmp_path / "out.importing"
    other.mkdir()
    with pytest.raises(PackagingError, match="could not load the GGUF file"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and other.is_dir()
    assert [p.name for p in tmp_path.iterdir() if "importing" in p.name] == ["out.importing"]


def test_missing_file_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(PackagingError, match="already exists"):
        import_gguf(_write_gguf(tmp_path / "m.gguf", "llama"), tmp_path / "out")


def test_cli_import_refuses_a_bad_file_with_a_message(tmp_path: Path) -> None:
    from tests.test_cli import autoglm

    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    r = autoglm("model", "import", str(bad), "--out", str(tmp_path / "out"), home=tmp_path)
    assert r.returncode == 1
    assert "not a GGUF file" in r.stderr
    r = autoglm("model", "package", str(tmp_path / "x.txt"), "--name", "n", "--version", "1", home=tmp_path)
    assert r.returncode == 2 and "neither a model folder nor a .gguf file" in r.stdout + r.stderr
