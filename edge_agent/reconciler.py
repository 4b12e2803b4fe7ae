"""The reconciler: drives the device from its persisted state toward the desired state.

Phases and their allowed transitions are in ``TRANSITIONS``; the state is saved before each step,
so after a crash the agent knows where it was. The active model keeps serving throughout: a new
model is fetched, verified, staged into the standby slot and smoke-tested before the switch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from edge_agent.fetcher import ShardFetcher
from edge_agent.model_host import LoadedModel, ModelHost
from edge_agent.settings import RuntimeSettings
from edge_agent.slots import SlotStore
from edge_agent.state import AgentState, SlotName, StateFile
from shared.blobs import BlobStore, file_digest
from shared.errors import AutoGLMError, FetchError, IntegrityError, ModelLoadError, SignatureError
from shared.manifest import Manifest, TrustStore
from shared.messages import DesiredState, ErrorInfo, ModelRef, Phase

log = logging.getLogger(__name__)

# An update interrupted by a crash restarts at FETCHING, which skips every blob already cached.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.FETCHING}),
    Phase.FETCHING: frozenset({Phase.FETCHING, Phase.VERIFYING, Phase.FAILED}),
    Phase.VERIFYING: frozenset({Phase.STAGED, Phase.FAILED, Phase.FETCHING}),
    Phase.STAGED: frozenset({Phase.SMOKE_TESTING, Phase.FAILED, Phase.FETCHING}),
    Phase.SMOKE_TESTING: frozenset({Phase.ACTIVE, Phase.FAILED, Phase.FETCHING}),
    Phase.ACTIVE: frozenset({Phase.FETCHING}),
    Phase.FAILED: frozenset({Phase.FETCHING}),
    Phase.ROLLING_BACK: frozenset({Phase.ACTIVE, Phase.FAILED}),
}

Reporter = Callable[[AgentState], Awaitable[None]]


class Reconciler:
    def __init__(
        self,
        state_file: StateFile,
        fetcher: ShardFetcher,
        cache: BlobStore,
        slots: SlotStore,
        host: ModelHost,
        trust: TrustStore,
        runtime: RuntimeSettings,
        report: Reporter,
    ) -> None:
        self.state_file = state_file
        self.state = state_file.load()
        self.fetcher = fetcher
        self.cache = cache
        self.slots = slots
        self.host = host
        self.trust = trust
        self.runtime = runtime
        self._report = report
        self._pending: DesiredState | None = None
        self._wake = asyncio.Event()

    def offer(self, desired: DesiredState) -> None:
        """Called for every desired-state message; only the newest revision is kept."""
        if self._pending is None or desired.revision >= self._pending.revision:
            self._pending = desired
            self._wake.set()

    async def restore(self) -> None:
        """Serve the active slot again after a restart, before anything else happens."""
        s = self.state
        if s.active_slot is not None and s.active_model is not None:
            try:
                self.host.swap(await asyncio.to_thread(self._load_slot, s.active_slot))
                log.info(
                    "serving %s from slot %s",
                    s.active_model.name + ":" + s.active_model.version,
                    s.active_slot,
                )
            except AutoGLMError as exc:
                log.error("active slot %s cannot be loaded: %s", s.active_slot, exc)
                s.last_error = ErrorInfo(code="active_slot_unloadable", message=str(exc))
        await self._report(self.state)

    async def run(self) -> None:
        await self.restore()
        if self.state.phase not in (Phase.IDLE, Phase.ACTIVE, Phase.FAILED) and self.state.target is not None:
            log.info("resuming an interrupted update to revision %d", self.state.target_revision)
            await self._update(self.state.target, self.state.target_revision)
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired, self._pending = self._pending, None
            if desired is not None:
                await self.apply(desired)

    async def apply(self, desired: DesiredState) -> None:
        s = self.state
        if desired.revision < s.applied_revision:
            log.info("ignoring stale desired revision %d (applied %d)", desired.revision, s.applied_revision)
            return
        if desired.model is None or desired.model == s.active_model:
            s.applied_revision = desired.revision
            self.state_file.save(s)
            await self._report(s)
            return
        if s.phase == Phase.FAILED and s.target == desired.model and s.target_revision == desired.revision:
            return  # already tried and reported; a new revision is needed to try again
        await self._update(desired.model, desired.revision)

    async def _transition(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.state.phase]:
            raise AssertionError(f"illegal transition {self.state.phase} -> {to}")
        self.state.phase = to
        self.state_file.save(self.state)
        await self._report(self.state)

    async def _update(self, ref: ModelRef, revision: int) -> None:
        s = self.state
        s.target, s.target_revision = ref, revision
        s.target_slot = s.standby_slot()
        s.last_error = None
        try:
            await self._transition(Phase.FETCHING)
            manifest_bytes = await self.fetcher.fetch_manifest(ref)
            # The signature is checked before a single weight is downloaded.
            manifest = self.trust.verify(manifest_bytes, expected_digest=ref.manifest_digest)
            await self.fetcher.fetch_blobs(manifest.blobs())

            await self._transition(Phase.VERIFYING)
            await asyncio.to_thread(self._verify_cache, manifest)
            slot = s.target_slot
            await asyncio.to_thread(self.slots.stage, slot, manifest, manifest_bytes, self.cache)
            s.slots[slot] = ref
            await self._transition(Phase.STAGED)

            await self._transition(Phase.SMOKE_TESTING)
            loaded = await asyncio.to_thread(self._load_slot, slot)
            await asyncio.to_thread(loaded.smoke_test)

            s.active_slot = slot
            s.applied_revision = revision
            s.target = None
            s.target_slot = None
            self.host.swap(loaded)
            await self._transition(Phase.ACTIVE)
            log.info("activated %s:%s in slot %s (revision %d)", ref.name, ref.version, slot, revision)
        except (AutoGLMError, OSError) as exc:
            await self._fail(exc)
        except Exception as exc:
            # Not a failure we foresaw; the old model keeps serving and the cloud hears about it.
            log.exception("unexpected error during the update")
            await self._fail(exc)

    async def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, SignatureError):
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
        if s.target_slot is not None and s.target_slot != s.active_slot:
            s.slots[s.target_slot] = None
        s.last_error = ErrorInfo(code=code, message=str(exc))
        s.phase = Phase.FAILED
        self.state_file.save(s)
        await self._report(s)

    def _verify_cache(self, manifest: Manifest) -> None:
        for blob in manifest.blobs():
            actual = file_digest(self.cache.path(blob.digest))
            if actual != blob.digest:
                self.cache.remove(blob.digest)
                raise IntegrityError("cached blob is damaged; it will be fetched again", digest=blob.digest)

    def _load_slot(self, slot: SlotName) -> LoadedModel:
        manifest = self.trust.verify(self.slots.manifest_bytes(slot))
        return LoadedModel.load(self.slots.path(slot), manifest, slot, self.runtime)
