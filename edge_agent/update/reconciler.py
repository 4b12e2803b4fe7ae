"""The reconciler: drives the device from its persisted state toward the desired state.

Phases and their allowed transitions are in ``TRANSITIONS``; the state is saved before each step,
so after a crash the agent knows where it was. The active model keeps serving throughout: a new
model is fetched, verified, staged into the standby slot and smoke-tested before the switch.
The previous model stays in the other slot: going back to it (a desired state naming it, or a
``rollback`` command) is a switch through ``switching`` with nothing to download.

Failpoints, for crash tests: ``AUTOGLM_EDGE_FAILPOINTS=verifying,activating`` makes the agent
stop (hang, after the state is saved) on entering those phases; ``activating`` is the moment
between a passed smoke test and the switch. Tests SIGKILL the agent there and restart it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_agent.runtime.host import LoadedModel, ModelHost
from edge_agent.update.fetcher import ChunkIndex, ShardFetcher, chunk_index
from edge_agent.update.slots import SlotStore
from edge_agent.update.state import AgentState, SlotName, StateFile
from shared.blobs import BlobStore, digest_of, file_digest
from shared.edge_config import EdgeConfig
from shared.errors import (
    AutoGLMError,
    ContractError,
    DowngradeError,
    FetchError,
    IntegrityError,
    ModelLoadError,
    NoSpaceError,
    SignatureError,
)
from shared.manifest import Manifest, TrustStore
from shared.messages import DesiredState, ErrorInfo, ModelRef, Phase

log = logging.getLogger(__name__)

# An update interrupted by a crash restarts at FETCHING, which skips every blob already cached.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.FETCHING}),
    # A download superseded by a newer desired state goes back to what serves (or to idle).
    Phase.FETCHING: frozenset({Phase.FETCHING, Phase.VERIFYING, Phase.FAILED, Phase.ACTIVE, Phase.IDLE}),
    Phase.VERIFYING: frozenset({Phase.STAGED, Phase.FAILED, Phase.FETCHING}),
    Phase.STAGED: frozenset({Phase.SMOKE_TESTING, Phase.FAILED, Phase.FETCHING}),
    Phase.SMOKE_TESTING: frozenset({Phase.ACTIVE, Phase.FAILED, Phase.FETCHING}),
    Phase.ACTIVE: frozenset({Phase.FETCHING, Phase.SWITCHING}),
    Phase.FAILED: frozenset({Phase.FETCHING, Phase.SWITCHING, Phase.ACTIVE}),
    Phase.SWITCHING: frozenset({Phase.ACTIVE, Phase.FAILED}),
}

FAILPOINTS_ENV = "AUTOGLM_EDGE_FAILPOINTS"

Reporter = Callable[[AgentState], Awaitable[None]]
# Applies a validated pushed config (the agent recomputes its serving settings).
ConfigApplier = Callable[[EdgeConfig], Awaitable[None]]


class Reconciler:
    def __init__(
        self,
        state_file: StateFile,
        fetcher: ShardFetcher,
        cache: BlobStore,
        slots: SlotStore,
        host: ModelHost,
        trust: TrustStore,
        providers: list[str] | None,
        report: Reporter,
        apply_config: ConfigApplier,
    ) -> None:
        self.state_file = state_file
        self.state = state_file.load()
        self.fetcher = fetcher
        self.cache = cache
        self.slots = slots
        self.host = host
        self.trust = trust
        self.providers = providers
        self.threads = 0  # set from the serving config by the agent
        self.kernels: Path | None = None  # the custom-op library models load with (settings)
        self._report = report
        self._apply_config = apply_config
        self._pending: DesiredState | None = None
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()
        # The download of the update in progress: a newer desired state cancels it (see offer).
        self._download: asyncio.Task[tuple[bytes, Manifest]] | None = None
        self.failpoints = frozenset(p for p in os.environ.get(FAILPOINTS_ENV, "").split(",") if p)

    def offer(self, desired: DesiredState) -> None:
        """Called for every desired-state message; only the newest revision is kept."""
        if self._pending is None or desired.revision >= self._pending.revision:
            self._pending = desired
            self._wake.set()
            download = self._download
            if download is not None and not download.done() and desired.revision > self.state.target_revision:
                # Waiting for a download the operator no longer wants (a blob that never arrives
                # whole, say) would hold the newer desired state back; the partial files stay.
                log.info(
                    "revision %d supersedes the download for revision %d",
                    desired.revision,
                    self.state.target_revision,
                )
                download.cancel()

    async def restore(self) -> None:
        """Serve the active slot again after a restart, before anything else happens: its files
        checked against its signed manifest first, the other slot's model served instead when
        they are damaged; after a state file was found damaged, the slots' own signed manifests
        say what is installed."""
        s = self.state
        installed = await asyncio.to_thread(self._slot_manifests)
        # Models installed before release numbers were tracked still count as installed.
        for _, manifest in installed:
            self._record_release(manifest)
        if self.state_file.recovered and installed:
            await asyncio.to_thread(self._rebuild, installed)
        if s.config:
            try:
                await self._apply_config(EdgeConfig.parse(s.config))
            except ContractError as exc:  # validated when accepted; only a hand edit gets here
                log.error("persisted config no longer valid, using edge.yaml alone: %s", exc)
        if s.active_slot is not None and s.active_model is not None:
            await self._serve_saved()
        await self._report(self.state)

    async def _serve_saved(self) -> None:
        s = self.state
        assert s.active_slot is not None
        try:
            loaded = await asyncio.to_thread(self._load_slot, s.active_slot, check_files=True)
        except AutoGLMError as exc:
            log.error("active slot %s cannot be loaded: %s", s.active_slot, exc)
            s.last_error = ErrorInfo(code="active_slot_unloadable", message=str(exc))
            other = s.standby_slot()
            if s.slots.get(other) is None:
                return
            try:
                loaded = await asyncio.to_thread(self._load_slot, other, check_files=True)
                await asyncio.to_thread(loaded.smoke_test)
            except AutoGLMError as again:
                log.error("slot %s cannot be loaded either: %s", other, again)
                return
            # The model before, rather than none. The damaged slot holds nothing it can vouch
            # for: the cloud's desired state for its model downloads it again, whole.
            log.warning("serving slot %s instead, the model installed before", other)
            s.slots[s.active_slot] = None
            s.active_slot = other
            s.evaluation = None  # measured on the damaged model, not on this one
            self._save_at_restore()
        self._mark_active()  # an agent from before the marker existed writes it now
        self.host.swap(loaded)
        log.info("serving %s from slot %s", loaded.model_id, s.active_slot)

    def _rebuild(self, installed: list[tuple[SlotName, Manifest]]) -> None:
        """A state from what the slots hold (their manifests were verified): the slot last
        activated active (slots/active.json), else the newest release. Revisions start afresh;
        the cloud's retained desired state sets them again."""
        s = self.state
        marked = self.slots.marked_active()
        newest: tuple[int, float, SlotName] | None = None
        for slot, manifest in installed:
            data = self.slots.manifest_bytes(slot)
            s.slots[slot] = ModelRef(
                name=manifest.name,
                version=manifest.version,
                manifest_digest=digest_of(data),
                manifest_size=len(data),
            )
            key = (manifest.release_number, self.slots.staged_at(slot), slot)
            newest = key if newest is None or key > newest else newest
        assert newest is not None
        by_marker = next(
            (
                slot
                for slot, ref in s.slots.items()
                if ref is not None and marked == (slot, ref.manifest_digest)
            ),
            None,
        )
        s.active_slot = by_marker or newest[2]
        s.phase = Phase.ACTIVE
        self._save_at_restore()
        log.warning(
            "state rebuilt from the slots: %s in slot %s taken as the active model (%s)",
            s.active_model.name + ":" + s.active_model.version if s.active_model else "?",
            s.active_slot,
            "the one last activated"
            if by_marker
            else "the newest release: no record of the one last activated",
        )

    async def run(self) -> None:
        await self.restore()
        if self.state.phase == Phase.SWITCHING:
            # Killed mid-switch: we serve whatever the saved active slot is; the retained desired
            # state (or the operator) asks again if the switch is still wanted.
            self.state.phase = Phase.ACTIVE if self.host.current is not None else Phase.FAILED
            self.state_file.save(self.state)
            await self._report(self.state)
        elif (
            self.state.phase not in (Phase.IDLE, Phase.ACTIVE, Phase.FAILED) and self.state.target is not None
        ):
            log.info("resuming an interrupted update to revision %d", self.state.target_revision)
            await self._update(
                self.state.target,
                self.state.target_revision,
                allow_downgrade=self.state.target_allow_downgrade,
            )
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired, self._pending = self._pending, None
            if desired is not None:
                async with self._busy:
                    try:
                        await self.apply(desired)
                    except Exception as exc:
                        # The loop outlives any one desired state (a full disk while saving, say):
                        # reported, and the next desired state is taken as usual.
                        log.exception("applying revision %d failed", desired.revision)
                        await self._fail(exc)

    async def apply(self, desired: DesiredState) -> None:
        s = self.state
        if desired.revision < s.revision_floor:
            log.info("ignoring stale desired revision %d (accepted %d)", desired.revision, s.revision_floor)
            return
        s.accepted_revision = max(s.accepted_revision, desired.revision)
        await self._take_config(desired)
        if desired.model is None or desired.model == s.active_model:
            s.applied_revision = desired.revision
            if s.phase == Phase.FAILED and s.active_model is not None:
                # The model that failed is no longer wanted; what we serve is what is desired.
                s.target, s.target_slot = None, None
                await self._transition(Phase.ACTIVE)
                return
            self.state_file.save(s)
            await self._report(s)
            return
        if s.phase == Phase.FAILED and s.target == desired.model and s.target_revision == desired.revision:
            return  # already tried and reported; a new revision is needed to try again
        standby = s.standby_slot()
        if s.active_slot is not None and s.slots.get(standby) == desired.model:
            await self._switch(standby, desired.revision, allow_downgrade=desired.allow_downgrade)
            return
        await self._update(desired.model, desired.revision, allow_downgrade=desired.allow_downgrade)

    async def _take_config(self, desired: DesiredState) -> None:
        """Validate the pushed config before anything uses it; a bad one is reported, the old kept."""
        s = self.state
        if desired.config == s.config:
            return
        try:
            parsed = EdgeConfig.parse(desired.config)
            await self._apply_config(parsed)
        except ContractError as exc:
            log.error("rejected config of revision %d: %s", desired.revision, exc)
            s.config_error = ErrorInfo(code="config_rejected", message=str(exc))
            s.config_error_revision = desired.revision
        else:
            s.config = dict(desired.config)
            s.config_revision = desired.revision
            s.config_error = None
            s.config_error_revision = None
            log.info("applied config of revision %d", desired.revision)
        self.state_file.save(s)
        await self._report(s)

    async def rollback(self) -> tuple[bool, str]:
        """Go back to the model in the standby slot (the ``rollback`` command).

        An emergency tool: the desired state still names the other model, and a re-delivered
        desired state (after a reconnect) wins. The control plane rolls back by changing it."""
        async with self._busy:
            s = self.state
            standby = s.standby_slot()
            previous = s.slots.get(standby)
            if s.active_slot is None or previous is None:
                return False, "no previous model to roll back to"
            # The command is signed by the control key: it is the authorization to go back.
            await self._switch(standby, s.applied_revision, allow_downgrade=True)
            if s.active_slot != standby:
                return False, f"rollback failed: {s.last_error.message if s.last_error else 'unknown'}"
            return True, f"serving {previous.name}:{previous.version} from slot {standby}"

    async def reload(self) -> None:
        """The ``reload`` command: load the active slot again, between updates."""
        async with self._busy:
            await self.reload_active()

    async def reload_active(self) -> None:
        """Load the active slot again (a new thread count); the caller is the reconciler's own flow."""
        s = self.state
        if s.active_slot is None:
            return
        loaded = await asyncio.to_thread(self._load_slot, s.active_slot)
        self.host.swap(loaded)
        log.info("reloaded slot %s with %d threads", s.active_slot, self.threads)

    async def _switch(self, slot: SlotName, revision: int, *, allow_downgrade: bool) -> None:
        """Activate a slot that is already staged: the instant rollback path."""
        s = self.state
        try:
            await self._transition(Phase.SWITCHING)
            manifest = await asyncio.to_thread(self.trust.verify, self.slots.manifest_bytes(slot))
            self._check_release(manifest, allow_downgrade)
            # The standby slot sat on disk since it was staged: checked as at a restart.
            loaded = await asyncio.to_thread(self._load_slot, slot, check_files=True)
            await asyncio.to_thread(loaded.smoke_test)
            evaluation = await asyncio.to_thread(loaded.evaluate)
            s.active_slot = slot
            s.applied_revision = revision
            s.target = None
            s.target_slot = None
            s.last_error = None
            s.evaluation = evaluation
            self.host.swap(loaded)
            await self._transition(Phase.ACTIVE)
            log.info("switched to %s in slot %s (revision %d)", loaded.model_id, slot, revision)
        except (AutoGLMError, OSError) as exc:
            await self._fail(exc, clear_target_slot=False)

    async def _transition(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.state.phase]:
            raise AssertionError(f"illegal transition {self.state.phase} -> {to}")
        self.state.phase = to
        self.state_file.save(self.state)  # a failure here fails the step (reported as such)
        if to is Phase.ACTIVE:
            self._mark_active()
        await self._report(self.state)
        await self._failpoint(to.value)

    async def _failpoint(self, name: str) -> None:
        if name in self.failpoints:
            log.warning("failpoint %s: holding here until the process is killed", name)
            await asyncio.Event().wait()

    async def _update(self, ref: ModelRef, revision: int, *, allow_downgrade: bool) -> None:
        s = self.state
        s.target, s.target_revision = ref, revision
        s.target_allow_downgrade = allow_downgrade
        s.target_slot = s.standby_slot()
        s.last_error = None
        try:
            await self._transition(Phase.FETCHING)
            self._download = asyncio.create_task(self._download_model(ref), name="model-download")
            if self._pending is not None and self._pending.revision > revision:
                # A newer revision arrived while FETCHING was being reported, before offer() could
                # see this download.
                self._download.cancel()
            try:
                manifest_bytes, manifest = await self._download
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the agent is stopping, not a newer revision
                await self._superseded()
                return
            finally:
                self._download = None

            await self._transition(Phase.VERIFYING)
            await asyncio.to_thread(self._verify_cache, manifest)
            slot = s.target_slot
            # Its files are about to be replaced: from here the slot holds no model it can vouch
            # for until staging ends (saved first, so that a crash in between says so too).
            s.slots[slot] = None
            self.state_file.save(s)
            await asyncio.to_thread(self.slots.stage, slot, manifest, manifest_bytes, self.cache)
            s.slots[slot] = ref
            await self._transition(Phase.STAGED)

            await self._transition(Phase.SMOKE_TESTING)
            loaded = await asyncio.to_thread(self._load_slot, slot)
            await asyncio.to_thread(loaded.smoke_test)
            # The package's evaluation set, before it serves: reported with the activation, for
            # the rollout's quality gate to judge (the device itself does not refuse a model).
            evaluation = await asyncio.to_thread(loaded.evaluate)
            if evaluation is not None:
                log.info(
                    "evaluation set of %s: %.1f%% of %d reference tokens agree (packager measured %.1f%%)",
                    evaluation.model,
                    evaluation.agreement * 100,
                    evaluation.tokens,
                    evaluation.expected * 100,
                )
            await self._failpoint("activating")

            s.active_slot = slot
            s.applied_revision = revision
            s.target = None
            s.target_slot = None
            # What the model now serving measured (None: its package has no set): never an
            # earlier model's figure, which the quality gate would take for this one's.
            s.evaluation = evaluation
            self._record_release(manifest)
            self.host.swap(loaded)
            await self._transition(Phase.ACTIVE)
            log.info("activated %s:%s in slot %s (revision %d)", ref.name, ref.version, slot, revision)
            await asyncio.to_thread(self._prune_cache)
        except (AutoGLMError, OSError) as exc:
            await self._fail(exc)
        except Exception as exc:
            # Not a failure we foresaw; the old model keeps serving and the cloud hears about it.
            log.exception("unexpected error during the update")
            await self._fail(exc)

    async def _download_model(self, ref: ModelRef) -> tuple[bytes, Manifest]:
        manifest_bytes = await self.fetcher.fetch_manifest(ref)
        # The signature, the name and the release are checked before a single weight is downloaded.
        manifest = self.trust.verify(manifest_bytes, expected_digest=ref.manifest_digest)
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise SignatureError(
                f"the signed manifest is {manifest.name}:{manifest.version}, "
                f"the desired state names {ref.name}:{ref.version}",
                digest=ref.manifest_digest,
            )
        self._check_release(manifest, self.state.target_allow_downgrade)
        # Partial files of updates given up on hold space this one needs.
        keep = {b.digest for b in manifest.blobs()} | {ref.manifest_digest}
        await asyncio.to_thread(self.fetcher.prune_partials, keep)
        reuse = await asyncio.to_thread(self._local_chunks, manifest)
        await self.fetcher.fetch_blobs(manifest.blobs(), reuse)
        return manifest_bytes, manifest

    def _check_release(self, manifest: Manifest, allow_downgrade: bool) -> None:
        """Anti-rollback: never a release below the highest installed, unless the signed desired
        state (or command) authorizes going back."""
        highest = self.state.releases.get(manifest.name)
        if highest is not None and manifest.release_number < highest and not allow_downgrade:
            raise DowngradeError(
                f"{manifest.name}:{manifest.version} is release {manifest.release_number}, below release "
                f"{highest} already installed, and the desired state does not authorize a rollback",
                name=manifest.name,
            )

    def _record_release(self, manifest: Manifest) -> None:
        highest = self.state.releases.get(manifest.name, -1)
        self.state.releases[manifest.name] = max(highest, manifest.release_number)

    def _forget_staged_target(self) -> None:
        """The standby slot forgets the target only if the target reached it (staged, then failed
        its smoke test, say). A download that failed or was given up never touched the slot: it
        still holds the previous model, the instant rollback's (and a switch's) source."""
        s = self.state
        if (
            s.target_slot is not None
            and s.target_slot != s.active_slot
            and s.slots.get(s.target_slot) == s.target
        ):
            s.slots[s.target_slot] = None

    async def _superseded(self) -> None:
        """A download given up for a newer desired state: back to serving what is active."""
        s = self.state
        self._forget_staged_target()
        s.target, s.target_slot = None, None
        await self._transition(Phase.ACTIVE if self.host.current is not None else Phase.IDLE)

    async def _fail(self, exc: BaseException, clear_target_slot: bool = True) -> None:
        if isinstance(exc, NoSpaceError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            code = "no_space"
            exc = NoSpaceError(f"{exc}; {self._free_bytes()} bytes free in the data folder")
        elif isinstance(exc, DowngradeError):
            code = "downgrade_refused"
        elif isinstance(exc, SignatureError):
            code = "signature_rejected"
        elif isinstance(exc, IntegrityError):
            code = "integrity_error"
        elif isinstance(exc, ModelLoadError):
            code = "model_load_failed"
        elif isinstance(exc, FetchError):
            code = "fetch_failed"
        else:
            code = type(exc).__name__
        log.error("update failed (%s): %s; staying on the current model", code, exc)
        s = self.state
        if clear_target_slot:
            self._forget_staged_target()
        s.last_error = ErrorInfo(code=code, message=str(exc))
        s.phase = Phase.FAILED
        self.save_state()
        await self._report(s)

    def save_state(self) -> bool:
        """Persist the state; a full or failing disk is logged and survived (the state stays in
        memory and is reported; the next step saves again)."""
        try:
            self.state_file.save(self.state)
            return True
        except OSError as exc:
            log.error("could not save the agent state (%s); carrying on with it in memory", exc)
            return False

    def _free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.state_file.path.parent).free
        except OSError:
            return -1

    def _verify_cache(self, manifest: Manifest) -> None:
        for blob in manifest.blobs():
            actual = file_digest(self.cache.path(blob.digest))
            if actual != blob.digest:
                self.cache.remove(blob.digest)
                raise IntegrityError("cached blob is damaged; it will be fetched again", digest=blob.digest)

    def _save_at_restore(self) -> None:
        """Serving comes first: a state that cannot be saved now (a full disk) is saved with
        the next step."""
        try:
            self.state_file.save(self.state)
        except OSError as exc:
            log.error("could not save the agent's state: %s", exc)

    def _mark_active(self) -> None:
        """Best effort: the marker only backs up the state file, which holds the same."""
        s = self.state
        if s.active_slot is None or s.active_model is None:
            return
        mark = (s.active_slot, s.active_model.manifest_digest)
        if self.slots.marked_active() == mark:
            return
        try:
            self.slots.mark_active(*mark)
        except OSError as exc:
            log.warning("could not record the active slot beside the state file: %s", exc)

    def _load_slot(self, slot: SlotName, *, check_files: bool = False) -> LoadedModel:
        """The model in ``slot``; ``check_files``: every file hashed against the signed manifest
        first (after a restart: a disk may have lost what staging wrote, verified)."""
        try:
            manifest_bytes = self.slots.manifest_bytes(slot)
        except FileNotFoundError as exc:
            raise ModelLoadError(f"slot {slot} holds no manifest", slot=slot) from exc
        manifest = self.trust.verify(manifest_bytes)
        if check_files:
            self.slots.check(slot, manifest)
        return LoadedModel.load(
            self.slots.path(slot),
            manifest,
            slot,
            threads=self.threads,
            providers=self.providers,
            custom_ops=self.kernels,
            digest=digest_of(manifest_bytes),
        )

    def _slot_manifests(self) -> list[tuple[SlotName, Manifest]]:
        found: list[tuple[SlotName, Manifest]] = []
        slot: SlotName
        for slot in ("a", "b"):
            try:
                found.append((slot, self.trust.verify(self.slots.manifest_bytes(slot))))
            except (FileNotFoundError, AutoGLMError):
                continue
        return found

    def _local_chunks(self, target: Manifest) -> ChunkIndex:
        """Chunks of the models in both slots: an update re-downloads only what changed. A file of
        ``target`` is also looked for at the same path in a slot (another version of it)."""
        installed = self._slot_manifests()
        same_place: dict[str, list[Path]] = {}
        for f in target.files:
            for slot, m in installed:
                if any(g.path == f.path for g in m.files):
                    same_place.setdefault(f.blob.digest, []).append(self.slots.path(slot) / f.path)
        return chunk_index(
            [(self.slots.path(slot) / f.path, f.blob) for slot, m in installed for f in m.files], same_place
        )

    def _prune_cache(self) -> None:
        """Keep only blobs the two slots use (and their manifests): disk use stays bounded."""
        keep: set[str] = set()
        for ref in self.state.slots.values():
            if ref is not None:
                keep.add(ref.manifest_digest)
        for _, manifest in self._slot_manifests():
            keep.update(b.digest for b in manifest.blobs())
        removed = 0
        for digest in list(self.cache.digests()):
            if digest not in keep:
                self.cache.remove(digest)
                removed += 1
        if removed:
            log.info("removed %d cached blob(s) no slot uses", removed)
