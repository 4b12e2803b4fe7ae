"""Local text for training the demo model and measuring perplexity: the Python stdlib sources.

No hub is reachable, and every machine with this Python has the same files, so the split is
deterministic: files are sorted, shuffled with a fixed seed (so a size cap still samples the
whole library, not the first package alphabetically), and every 10th one is held out.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

HELDOUT_EVERY = 10


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # encodings/ is mostly generated code-page tables: it would teach the model tables, not Python.
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "encodings"}
    files = [
        p
        for p in root.rglob("*.py")
        if not (skip & set(p.relative_to(root).parts)) and p.stat().st_size > 2000
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    random.Random(0).shuffle(files)  # noqa: S311 (a fixed sample order, not a secret)
    return files


def _collect(files: list[Path], max_bytes: int) -> str:
    parts: list[str] = []
    total = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "\n".join(parts)[:max_bytes]


def training_text(max_bytes: int = 4_000_000) -> str:
    files = [p for i, p in enumerate(_stdlib_files()) if i % HELDOUT_EVERY != 0]
    return _collect(files, max_bytes)


def heldout_text(max_bytes: int = 60_000) -> str:
    files = [p for i, p in enumerate(_stdlib_files()) if i % HELDOUT_EVERY == 0]
    return _collect(files, max_bytes)
