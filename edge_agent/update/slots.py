"""A/B model slots on disk: a slot is staged completely beside the live one, then switched to."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from edge_agent.update.state import SlotName
from shared.blobs import BlobStore, atomic_write, file_digest
from shared.errors import IntegrityError
from shared.manifest import Manifest

MANIFEST_FILE = "manifest.json"
# Each file's (size, mtime, inode) when it was last hashed whole (SlotStore.check).
STAMP_FILE = ".verified.json"
ACTIVE_FILE = "active.json"


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
        # Every blob was hashed against the manifest before staging (the reconciler's
        # verifying phase): the files as they are now are the ones a restart need not hash.
        stamps = {f.path: _stamp(staging / f.path) for f in manifest.files}
        (staging / STAMP_FILE).write_text(json.dumps(stamps))
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
        ``manifest`` lists. A file whose size, modification time and inode are those recorded
        when it was last found whole is taken as whole (hashing a large model on every start
        would keep a slow board from serving for as long); any other is hashed."""
        stamps = self._stamps(slot)
        seen: dict[str, list[int]] = {}
        for f in manifest.files:
            path = self.path(slot) / f.path
            try:
                stamp = _stamp(path)
                actual: str | None
                if stamps.get(f.path) == stamp:
                    actual = f.blob.digest
                else:
                    actual = file_digest(path) if stamp[0] == f.blob.size else None
            except OSError as exc:
                raise IntegrityError(f"slot {slot} lacks {f.path}: {exc.strerror}", slot=slot) from exc
            if actual != f.blob.digest:
                raise IntegrityError(f"slot {slot}'s {f.path} is damaged", slot=slot, digest=f.blob.digest)
            seen[f.path] = stamp
        if seen != stamps:
            # A cache of this check's work; a full disk only means hashing again next time.
            with contextlib.suppress(OSError):
                atomic_write(self.path(slot) / STAMP_FILE, json.dumps(seen).encode())

    def _stamps(self, slot: SlotName) -> dict[str, list[int]]:
        try:
            data = json.loads((self.path(slot) / STAMP_FILE).read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def mark_active(self, slot: SlotName, manifest_digest: str) -> None:
        """Beside the state file, which slot serves: what a state rebuilt after that file was
        lost goes by (the newest release may be one that failed, or one rolled back from)."""
        atomic_write(
            self.root / ACTIVE_FILE, json.dumps({"slot": slot, "manifest_digest": manifest_digest}).encode()
        )

    def marked_active(self) -> tuple[str, str] | None:
        try:
            data = json.loads((self.root / ACTIVE_FILE).read_bytes())
            return str(data["slot"]), str(data["manifest_digest"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _stamp(path: Path) -> list[int]:
    """What says a file is as it was when last hashed: its size, modification time and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]
