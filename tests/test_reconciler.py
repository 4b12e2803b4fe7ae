"""The reconciler's branches (edge_agent/update/reconciler.py), one scenario each, in process:
a real state file, real A/B slots and a real trust store on a temporary folder; fakes only at
two seams — the fetcher (blobs come from a local store) and the model load (no ONNX session).
The same state machine against real processes and a broker: tests/test_edge_updates.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.runtime.host import ModelHost
from edge_agent.update.reconciler import Reconciler
from edge_agent.update.slots import SlotStore
from edge_agent.update.state import AgentState, SlotName, StateFile
from shared.blobs import BlobRef, BlobStore, describe_bytes
from shared.edge_config import EdgeConfig
from shared.errors import ModelLoadError, NoSpaceError
from shared.manifest import FileEntry, IOSignature, Manifest, Quantization, SignedManifest, TrustStore
from shared.messages import DesiredState, ModelRef, Phase
from shared.signing import SigningKey

KEY = SigningKey.generate()


def package(store: BlobStore, version: str, release: int, name: str = "m") -> ModelRef:
    """A signed manifest with one small graph file, both in ``store``."""
    graph = f"graph of {name}:{version}".encode()
    store.put_bytes(graph)
    manifest = Manifest(
        name=name,
        version=version,
        release=release,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        architecture="LlamaForCausalLM",
        parameters=1,
        files=[FileEntry(path="model.onnx", role="graph", blob=describe_bytes(graph))],
        io=IOSignature(
            inputs=[],
            outputs=[],
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            vocab_size=8,
            context_length=8,
            model_type="llama",
        ),
        quantization=Quantization(method="none", weight_type="float32"),
    )
    data = SignedManifest.sign(manifest, KEY).to_json()
    digest = store.put_bytes(data)
    return ModelRef(name=name, version=version, manifest_digest=digest, manifest_size=len(data))


class FakeFetcher:
    """Blobs from a local store instead of MQTT; can fail, or hold a download until released."""

    def __init__(self, source: BlobStore, cache: BlobStore) -> None:
        self.source, self.cache = source, cache
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.fetched: list[str] = []

    async def fetch_manifest(self, ref: ModelRef) -> bytes:
        data = self.source.read(ref.manifest_digest)
        self.cache.put_bytes(data)
        self.fetched.append(ref.manifest_digest)
        return data

    async def fetch_blobs(self, blobs: list[BlobRef], reuse: Any = None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        for blob in blobs:
            self.cache.put_bytes(self.source.read(blob.digest))
            self.fetched.append(blob.digest)

    def prune_partials(self, keep: Iterable[str]) -> int:
        return 0


@dataclass
class FakeLoaded:
    manifest: Manifest
    slot: str
    broken: bool = False

    @property
    def model_id(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    def smoke_test(self) -> None:
        if self.broken:
            raise ModelLoadError("the smoke test produced no token", slot=self.slot)

    def evaluate(self) -> None:
        return None  # these packages carry no evaluation set


class Device:
    def __init__(self, tmp: Path) -> None:
        self.source = BlobStore(tmp / "cloud")
        self.cache = BlobStore(tmp / "cache")
        self.fetcher = FakeFetcher(self.source, self.cache)
        self.slots = SlotStore(tmp / "slots")
        self.host = ModelHost()
        self.reports: list[AgentState] = []
        self.configs: list[EdgeConfig] = []
        self.broken_versions: set[str] = set()
        self.trust = TrustStore([KEY.public])

        async def report(state: AgentState) -> None:
            self.reports.append(state.model_copy(deep=True))

        async def apply_config(config: EdgeConfig) -> None:
            self.configs.append(config)

        self.rec = Reconciler(
            StateFile(tmp / "state.json"),
            self.fetcher,  # type: ignore[arg-type]
            self.cache,
            self.slots,
            self.host,
            self.trust,
            None,
            report,
            apply_config,
        )
        self.rec._load_slot = self._load  # type: ignore[method-assign]

    def _load(self, slot: SlotName, *, check_files: bool = False) -> FakeLoaded:
        manifest = self.trust.verify(self.slots.manifest_bytes(slot))
        if check_files:
            self.slots.check(slot, manifest)
        return FakeLoaded(manifest, slot, broken=manifest.version in self.broken_versions)

    def apply(self, revision: int, model: ModelRef | None, **fields: Any) -> AgentState:
        asyncio.run(self.rec.apply(DesiredState(revision=revision, model=model, **fields)))
        return self.rec.state

    @property
    def serving(self) -> str | None:
        current = self.host.current
        return current.model_id if current else None

    def phases(self) -> list[Phase]:
        return [r.phase for r in self.reports]


@pytest.fixture
def dev(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_a_new_model_walks_every_phase_to_active(dev: Device) -> None:
    v1 = package(dev.source, "1", release=1)
    s = dev.apply(1, v1)
    assert dev.phases() == [Phase.FETCHING, Phase.VERIFYING, Phase.STAGED, Phase.SMOKE_TESTING, Phase.ACTIVE]
    assert (s.phase, s.active_slot, s.applied_revision, s.releases) == (Phase.ACTIVE, "a", 1, {"m": 1})
    assert dev.serving == "m:1" and StateFile(dev.rec.state_file.path).load() == s


def test_the_next_model_goes_to_the_other_slot_and_keeps_the_first(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    s = dev.apply(2, v2)
    assert (s.active_slot, s.slots) == ("b", {"a": v1, "b": v2}) and dev.serving == "m:2"


def test_a_stale_revision_is_ignored(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(5, v1)
    dev.reports.clear()
    s = dev.apply(4, v2)
    assert dev.reports == [] and s.applied_revision == 5 and dev.serving == "m:1"


def test_a_new_config_with_the_same_model_downloads_nothing(dev: Device) -> None:
    v1 = package(dev.source, "1", 1)
    dev.apply(1, v1)
    fetched = list(dev.fetcher.fetched)
    s = dev.apply(2, v1, config={"runtime": {"queue_size": 4}})
    assert dev.fetcher.fetched == fetched
    assert (s.config_revision, s.applied_revision, len(dev.configs)) == (2, 2, 1)


def test_a_bad_config_is_reported_and_the_old_one_kept(dev: Device) -> None:
    v1 = package(dev.source, "1", 1)
    dev.apply(1, v1, config={"runtime": {"queue_size": 4}})
    s = dev.apply(2, v1, config={"runtime": {"queue_size": -1}})
    assert s.config == {"runtime": {"queue_size": 4}} and s.config_revision == 1
    assert s.config_error is not None and s.config_error.code == "config_rejected"
    assert s.config_error_revision == 2


def test_the_model_in_the_standby_slot_is_switched_to_without_a_download(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.apply(2, v2)
    fetched = list(dev.fetcher.fetched)
    dev.reports.clear()
    s = dev.apply(3, v1, allow_downgrade=True)
    assert dev.fetcher.fetched == fetched
    assert dev.phases() == [Phase.SWITCHING, Phase.ACTIVE]
    assert (s.active_slot, dev.serving, s.applied_revision) == ("a", "m:1", 3)


def test_a_lower_release_is_refused_unless_the_desired_state_authorizes_it(dev: Device) -> None:
    v1, v2, v3 = package(dev.source, "1", 1), package(dev.source, "2", 2), package(dev.source, "3", 3)
    dev.apply(1, v2)
    dev.apply(2, v3)
    s = dev.apply(3, v1)  # release 1 after 3, not in a slot: a download, refused before any weight
    assert s.phase == Phase.FAILED and s.last_error is not None and s.last_error.code == "downgrade_refused"
    assert dev.serving == "m:3" and v1.manifest_digest in dev.fetcher.fetched
    s = dev.apply(4, v1, allow_downgrade=True)
    assert s.phase == Phase.ACTIVE and dev.serving == "m:1" and s.releases == {"m": 3}


def test_a_manifest_naming_another_model_than_the_desired_state_is_refused(dev: Device) -> None:
    other = package(dev.source, "9", 9, name="other")
    forged = ModelRef(
        name="m", version="1", manifest_digest=other.manifest_digest, manifest_size=other.manifest_size
    )
    s = dev.apply(1, forged)
    assert s.phase == Phase.FAILED and s.last_error is not None and s.last_error.code == "signature_rejected"
    assert dev.serving is None and s.slots.get("a") is None


def test_a_full_disk_fails_the_update_and_the_active_model_keeps_serving(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.fetcher.fail = NoSpaceError("model needs 4096 more bytes but only 100 are free on disk")
    s = dev.apply(2, v2)
    assert s.phase == Phase.FAILED and s.last_error is not None and s.last_error.code == "no_space"
    assert "4096" in s.last_error.message and dev.serving == "m:1" and s.slots["b"] is None
    dev.fetcher.fail = None
    s = dev.apply(3, v2)  # space freed; the operator publishes again
    assert s.phase == Phase.ACTIVE and dev.serving == "m:2"


def test_a_model_that_fails_its_smoke_test_is_never_activated(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.broken_versions.add("2")
    s = dev.apply(2, v2)
    assert s.phase == Phase.FAILED and s.last_error is not None and s.last_error.code == "model_load_failed"
    assert dev.serving == "m:1" and s.active_slot == "a" and s.slots["b"] is None


def test_a_failed_revision_is_not_retried_but_a_new_one_is(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.broken_versions.add("2")
    dev.apply(2, v2)
    dev.reports.clear()
    dev.apply(2, v2)  # the same desired state again (a reconnect re-delivers it)
    assert dev.reports == []
    dev.broken_versions.clear()
    assert dev.apply(3, v2).phase == Phase.ACTIVE and dev.serving == "m:2"


def test_going_back_to_the_active_model_after_a_failure_clears_it(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.broken_versions.add("2")
    dev.apply(2, v2)
    s = dev.apply(3, v1)
    assert (s.phase, s.target, s.applied_revision, dev.serving) == (Phase.ACTIVE, None, 3, "m:1")


def test_a_newer_revision_supersedes_a_download_in_progress(dev: Device) -> None:
    v1, v2, v3 = package(dev.source, "1", 1), package(dev.source, "2", 2), package(dev.source, "3", 3)
    dev.apply(1, v1)

    async def scenario() -> None:
        dev.fetcher.gate = asyncio.Event()  # v2's blobs never come
        first = asyncio.create_task(dev.rec.apply(DesiredState(revision=2, model=v2)))
        while dev.rec.state.phase != Phase.FETCHING:  # noqa: ASYNC110 (the reconciler's own state)
            await asyncio.sleep(0.01)
        dev.rec.offer(DesiredState(revision=3, model=v3))  # what the MQTT link calls
        await asyncio.wait_for(first, 5)
        # Back to serving what is active, with no failure reported for the abandoned download.
        assert dev.rec.state.phase == Phase.ACTIVE and dev.serving == "m:1"
        assert dev.rec.state.last_error is None and Phase.FAILED not in dev.phases()
        dev.fetcher.gate = None
        await dev.rec.apply(DesiredState(revision=3, model=v3))

    asyncio.run(scenario())
    assert dev.serving == "m:3" and dev.rec.state.applied_revision == 3


def _supersede(dev: Device, first: DesiredState, newer: DesiredState) -> None:
    """``first``'s download hangs until ``newer`` arrives (as the MQTT link offers it), which
    gives it up."""

    async def scenario() -> None:
        dev.fetcher.gate = asyncio.Event()
        task = asyncio.create_task(dev.rec.apply(first))
        while dev.rec.state.phase != Phase.FETCHING:  # noqa: ASYNC110 (the reconciler's own state)
            await asyncio.sleep(0.01)
        dev.rec.offer(newer)
        await asyncio.wait_for(task, 5)
        dev.fetcher.gate = None

    asyncio.run(scenario())


def test_a_first_download_superseded_goes_back_to_idle(dev: Device) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    _supersede(dev, DesiredState(revision=1, model=v1), DesiredState(revision=2, model=v2))
    assert dev.rec.state.phase == Phase.IDLE and dev.serving is None and Phase.FAILED not in dev.phases()


def test_a_download_that_fails_or_is_given_up_keeps_the_previous_model_for_a_rollback(dev: Device) -> None:
    """Only staging touches the standby slot: a failed or superseded download used to clear its
    record of the previous model, so the rollback command found nothing to go back to and going
    back took a whole download."""
    from shared.errors import FetchError

    v1, v2, v3, v4 = (package(dev.source, str(i), i) for i in (1, 2, 3, 4))
    dev.apply(1, v1)
    dev.apply(2, v2)
    dev.fetcher.fail = FetchError("the manifest never came")
    s = dev.apply(3, v3)
    assert s.phase == Phase.FAILED and s.slots == {"a": v1, "b": v2} and dev.serving == "m:2"
    dev.fetcher.fail = None

    _supersede(dev, DesiredState(revision=4, model=v3), DesiredState(revision=5, model=v4))
    assert dev.rec.state.slots == {"a": v1, "b": v2}
    fetched = list(dev.fetcher.fetched)
    ok, detail = asyncio.run(dev.rec.rollback())
    assert ok and dev.serving == "m:1" and detail.startswith("serving m:1"), detail
    assert dev.fetcher.fetched == fetched  # a switch, nothing downloaded


def test_a_slot_being_staged_holds_no_model_until_staging_ends(
    dev: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2, v3 = package(dev.source, "1", 1), package(dev.source, "2", 2), package(dev.source, "3", 3)
    dev.apply(1, v1)
    dev.apply(2, v2)
    saved: list[AgentState] = []

    def stage_fails(*args: Any) -> None:
        saved.append(StateFile(dev.rec.state_file.path).load())  # what a crash here would find
        raise OSError(5, "I/O error while writing the slot")

    monkeypatch.setattr(dev.slots, "stage", stage_fails)
    s = dev.apply(3, v3)
    assert saved[0].slots == {"a": None, "b": v2} and saved[0].phase == Phase.VERIFYING
    assert s.phase == Phase.FAILED and s.slots == {"a": None, "b": v2} and dev.serving == "m:2"


def test_a_revision_older_than_one_that_failed_is_a_replay(dev: Device) -> None:
    """An attacker on the broker held back a signed revision 3 and plays it after revision 4
    failed: it used to be obeyed (only the applied revision, 2, was compared)."""
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.apply(2, v2)
    dev.broken_versions.add("1")
    s = dev.apply(4, v1, allow_downgrade=True)
    assert s.phase == Phase.FAILED and s.applied_revision == 2 and s.revision_floor == 4
    dev.broken_versions.clear()
    dev.reports.clear()
    s = dev.apply(3, v1, allow_downgrade=True)
    assert dev.reports == [] and dev.serving == "m:2" and s.applied_revision == 2
    # A state file written before the newest accepted revision was kept knows a failed download's.
    assert AgentState.model_validate({"applied_revision": 2, "target_revision": 4}).revision_floor == 4
    assert dev.apply(5, v1, allow_downgrade=True).phase == Phase.ACTIVE and dev.serving == "m:1"


def test_a_restart_over_a_damaged_active_slot_serves_the_model_before(dev: Device, tmp_path: Path) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.apply(2, v2)
    (tmp_path / "slots" / "b" / "model.onnx").write_bytes(b"graph of m:2, but a sector lost")
    again = Device(tmp_path)
    asyncio.run(again.rec.restore())
    s = again.rec.state
    assert again.serving == "m:1" and s.active_slot == "a" and s.active_model == v1
    assert s.last_error is not None and s.last_error.code == "active_slot_unloadable"
    assert "slot b's model.onnx is damaged" in s.last_error.message
    saved = StateFile(tmp_path / "state.json").load()
    assert saved.active_slot == "a" and saved.slots == {"a": v1, "b": None}
    # The cloud's desired state for the damaged model downloads it again, whole.
    again.cache.remove(v2.manifest_digest)
    assert again.apply(2, v2).active_slot == "b" and again.serving == "m:2"
    assert v2.manifest_digest in again.fetcher.fetched
    assert (tmp_path / "slots" / "b" / "model.onnx").read_bytes() == b"graph of m:2"


def test_a_restart_hashes_only_the_files_that_changed_since_they_were_verified(
    dev: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.update import slots as slots_module

    hashed: list[Path] = []
    real = slots_module.file_digest

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(slots_module, "file_digest", counting)
    dev.apply(1, package(dev.source, "1", 1))
    asyncio.run(Device(tmp_path).rec.restore())
    assert hashed == []  # staged from verified blobs: nothing to hash at a restart
    graph = tmp_path / "slots" / "a" / "model.onnx"
    os.utime(graph, ns=(1, 1))  # touched, same bytes
    again = Device(tmp_path)
    asyncio.run(again.rec.restore())
    assert hashed == [graph] and again.serving == "m:1"
    asyncio.run(Device(tmp_path).rec.restore())
    assert hashed == [graph]  # found whole once: its new stamp recorded


def test_a_rebuilt_state_serves_the_model_last_activated_not_the_newest(dev: Device, tmp_path: Path) -> None:
    """The newest release on disk may be one that failed its smoke test, or one rolled back from."""
    v1, v2, v3 = package(dev.source, "1", 1), package(dev.source, "2", 2), package(dev.source, "3", 3)
    dev.apply(1, v1)
    dev.broken_versions.add("2")
    assert dev.apply(2, v2).phase is Phase.FAILED  # v2 staged in slot b, never served
    state = tmp_path / "state.json"
    state.write_text("{")
    again = Device(tmp_path)
    asyncio.run(again.rec.restore())
    assert again.serving == "m:1" and again.rec.state.active_slot == "a"
    # Rolled back: v3 in slot b, v1 (release 1) active in slot a by a signed downgrade.
    again.apply(3, v3)
    assert again.apply(4, v1, allow_downgrade=True).active_slot == "a"
    state.write_text("{")
    third = Device(tmp_path)
    asyncio.run(third.rec.restore())
    assert third.serving == "m:1" and third.rec.state.slots == {"a": v1, "b": v3}


def test_a_restart_with_both_slots_damaged_serves_nothing_and_says_why(dev: Device, tmp_path: Path) -> None:
    v1, v2 = package(dev.source, "1", 1), package(dev.source, "2", 2)
    dev.apply(1, v1)
    dev.apply(2, v2)
    for slot in "ab":
        (tmp_path / "slots" / slot / "model.onnx").unlink()
    again = Device(tmp_path)
    asyncio.run(again.rec.restore())
    assert again.serving is None and again.rec.state.active_slot == "b"
    assert again.rec.state.last_error is not None and "lacks model.onnx" in again.rec.state.last_error.message


def test_a_damaged_state_file_is_rebuilt_from_the_slots(dev: Device, tmp_path: Path) -> None:
    """Before: a damaged state.json was set aside and the device served nothing until the cloud
    sent a desired state again (offline: never)."""
    v1, v2, v3 = package(dev.source, "1", 1), package(dev.source, "2", 2), package(dev.source, "3", 3)
    dev.apply(1, v1)
    dev.apply(2, v2)
    dev.apply(3, v3)  # slot a now holds release 3, slot b release 2
    state = tmp_path / "state.json"
    state.write_bytes(state.read_bytes()[:60])
    again = Device(tmp_path)
    asyncio.run(again.rec.restore())
    s = again.rec.state
    assert again.serving == "m:3" and s.active_slot == "a" and s.slots == {"a": v3, "b": v2}
    assert s.phase is Phase.ACTIVE and s.releases == {"m": 3}
    assert StateFile(state).load() == s and len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    # The slot with the model before is still the standby: a rollback needs no download.
    assert again.apply(4, v2, allow_downgrade=True).active_slot == "b" and again.serving == "m:2"
    assert again.fetcher.fetched == []
