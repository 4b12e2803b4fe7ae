"""A/B model slots on disk: a slot is staged completely beside the live one, then switched to."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edge_agent.update.state import SlotName
from shared.blobs import BlobStore, file_digest
from shared.errors import IntegrityError
from shared.manifest import Manifest

MANIFEST_FILE = "manifest.json"


class SlotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, slot: SlotName) -> Path:
        return self.root / slot

    def stage(self, slot: SlotName, manifest: Manifest, manifest_bytes: bytes, cache: BlobStore) -> Path:
        """Fill ``slot`` from verified blobs; the slot appears whole or not at all."""
        staging = self.root / f".staging-{slot}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in manifest.files:
            src = cache.path(f.blob.digest)
            if not src.is_file():
                raise IntegrityError(
                    "blob missing from the cache at staging time", digest=f.blob.digest, path=f.path
                )
            dest = staging / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
        target = self.path(slot)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return target

    def manifest_bytes(self, slot: SlotName) -> bytes:
        return (self.path(slot) / MANIFEST_FILE).read_bytes()

    def staged_at(self, slot: SlotName) -> float:
        """When ``slot`` was last staged (its manifest's time)."""
        return (self.path(slot) / MANIFEST_FILE).stat().st_mtime

    def check(self, slot: SlotName, manifest: Manifest) -> None:
        """IntegrityError naming the first file of ``slot`` that is missing or not the bytes
        ``manifest`` lists."""
        for f in manifest.files:
            path = self.path(slot) / f.path
            try:
                actual = file_digest(path) if path.stat().st_size == f.blob.size else None
            except OSError as exc:
                raise IntegrityError(f"slot {slot} lacks {f.path}: {exc.strerror}", slot=slot) from exc
            if actual != f.blob.digest:
                raise IntegrityError(f"slot {slot}'s {f.path} is damaged", slot=slot, digest=f.blob.digest)
