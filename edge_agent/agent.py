"""EdgeAgent: wires settings, MQTT link, outbox, fetcher, reconciler and the model host together."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import uuid
from pathlib import Path

from edge_agent.datadir import DataDir
from edge_agent.runtime.host import ModelHost
from edge_agent.runtime.session import choose_providers
from edge_agent.serving.config import ServingConfig
from edge_agent.settings import EdgeSettings, url_allowed
from edge_agent.update.fetcher import ShardFetcher
from edge_agent.update.reconciler import Reconciler
from edge_agent.update.slots import SlotStore
from edge_agent.update.state import AgentState, StateFile
from edge_agent.uplink.link import CloudLink
from edge_agent.uplink.outbox import Outbox
from edge_agent.uplink.telemetry import OutboxSender, TelemetryRecorder
from shared.blobs import BlobStore
from shared.control import ControlVerifier
from shared.edge_config import EdgeConfig
from shared.errors import AutoGLMError, ConfigError, ContractError, ControlRejected
from shared.manifest import TrustStore
from shared.messages import Ack, Capabilities, Command, CommandReply, DesiredState, ErrorInfo, ReportedState
from shared.tasks import TaskSet
from shared.topics import Topics

log = logging.getLogger(__name__)


def preflight(settings: EdgeSettings) -> None:
    """What would stop an agent with ``settings`` starting, as a ConfigError naming it (inside
    the server's start the same failure ends in a traceback): a data folder it cannot write or
    another agent holds, a state file it may not read."""
    DataDir.claim(settings.data_dir).release()
    state = settings.data_dir / "state.json"
    if state.is_file() and not os.access(state, os.R_OK | os.W_OK):
        raise ConfigError("the agent's state file cannot be read and written", path=str(state))


class EdgeAgent:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        data = settings.data_dir
        # Held for the process's serving life (the app's lifespan releases it), not only while
        # run() runs: a background loop that died must not free the folder for another agent
        # while this one still answers.
        self.data_dir = DataDir.claim(data)
        try:
            self._wire(settings, data)
        except BaseException:
            # A start that failed part way leaves the folder free, its outbox closed.
            if (outbox := getattr(self, "outbox", None)) is not None:
                outbox.close()
            self.data_dir.release()
            raise

    def _wire(self, settings: EdgeSettings, data: Path) -> None:
        self.topics = Topics(settings.tenant)
        self.cache = BlobStore(data / "blobs")
        self.local_config = settings.local_config()
        self.serving = ServingConfig.resolve(self.local_config)
        self.host = ModelHost(self.serving.queue_size, self.serving.parallel, self.serving.batch_invariant)
        self.link = CloudLink(
            settings.broker,
            self.topics,
            settings.device_id,
            on_desired=self._on_desired,
            on_chunk=self._on_chunk,
            on_command=self._on_command,
            on_ack=self._on_ack,
            on_range=self._on_range,
        )
        self.outbox = Outbox(data / "outbox.sqlite3", settings.outbox.max_records)
        self.telemetry = TelemetryRecorder(self.outbox, self.topics, settings.device_id)
        self.sender = OutboxSender(
            self.outbox,
            settings.device_id,
            self.link.publish,
            self.link.connected,
            batch_size=lambda: self.serving.telemetry_batch_size,
            linger_s=lambda: self.serving.telemetry_flush_interval_s,
            sessions=lambda: self.link.sessions,
            ack_timeout_s=settings.outbox.ack_timeout_s,
            max_in_flight=settings.outbox.max_in_flight,
        )
        self.fetcher = ShardFetcher(
            settings.device_id,
            self.cache,
            data / "partial",
            self.link,
            chunks_per_request=settings.fetch.chunks_per_request,
            request_timeout_s=settings.fetch.request_timeout_s,
            max_attempts_without_progress=settings.fetch.max_attempts_without_progress,
            max_bytes_per_s=settings.fetch.max_bytes_per_s,
            max_chunk_rejections=settings.fetch.max_chunk_rejections,
        )
        self.reconciler = Reconciler(
            StateFile(data / "state.json"),
            self.fetcher,
            self.cache,
            SlotStore(data / "slots"),
            self.host,
            TrustStore(settings.public_keys()),
            settings.runtime.providers,
            self._report,
            self._apply_config,
        )
        self.reconciler.threads = self.serving.threads
        self.reconciler.kernels = settings.runtime.kernel_library()
        self.control = ControlVerifier(
            settings.control.public_keys(),
            device_id=settings.device_id,
            tenant=settings.tenant,
            max_clock_skew_s=settings.control.max_clock_skew_s,
        )
        self.allowed_cloud_urls = settings.allowed_cloud_urls()
        # Control messages refused since start (unsigned, forged, replayed, expired, …).
        self.control_rejections = 0
        self._background = TaskSet(log)

        log.info(
            "device %s (tenant %s) trusts manifest keys %s and control keys %s",
            settings.device_id,
            settings.tenant,
            ", ".join(self.reconciler.trust.key_ids),
            ", ".join(self.control.key_ids),
        )

    def _on_desired(self, desired: DesiredState) -> None:
        s = self.reconciler.state
        try:
            self.control.check(desired)
            if desired.revision < s.revision_floor:
                raise ControlRejected(
                    f"desired revision {desired.revision} is older than revision {s.revision_floor} "
                    "already accepted (a replay)",
                    code="stale_revision",
                )
        except ControlRejected as exc:
            self._refuse(exc)
            return
        if s.control_error is not None:
            s.control_error = None  # saved and reported by the reconciler as it applies this one
        self.reconciler.offer(desired)

    def _refuse(self, exc: ControlRejected) -> None:
        """Log, count and report a refused control message; refusals of the kind already reported
        are only counted, so a flood of forgeries or replays cannot flood the outbox."""
        self.control_rejections += 1
        log.warning("refused a control message (%s): %s", exc.code, exc)
        s = self.reconciler.state
        if s.control_error is not None and s.control_error.code == exc.code:
            return
        s.control_error = ErrorInfo(code=exc.code, message=str(exc))
        self.reconciler.save_state()
        self._report_now(s)

    def _on_ack(self, ack: Ack) -> None:
        self.outbox.acknowledge(ack.ids)

    def _on_chunk(self, digest: str, index: int, data: bytes) -> None:
        self.fetcher.on_chunk(digest, index, data)

    def _on_range(self, digest: str, offset: int, data: bytes) -> None:
        self.fetcher.on_range(digest, offset, data)

    async def _on_command(self, command: Command) -> CommandReply:
        s = self.reconciler.state
        try:
            self.control.check(command)
            if command.counter <= s.command_counter:
                raise ControlRejected(
                    f"command counter {command.counter} is not above {s.command_counter}, "
                    "the last one obeyed (a replay)",
                    code="replayed_command",
                )
        except ControlRejected as exc:
            self._refuse(exc)
            return CommandReply(
                request_id=command.request_id,
                device_id=self.settings.device_id,
                ok=False,
                detail=f"refused: {exc}",
            )
        # Saved before acting: a command is obeyed at most once, even across a crash.
        previous, s.command_counter = s.command_counter, command.counter
        if not self.reconciler.save_state():
            s.command_counter = previous
            return CommandReply(
                request_id=command.request_id,
                device_id=self.settings.device_id,
                ok=False,
                detail="not obeyed: the device cannot persist its command counter (disk full?)",
            )
        if command.action == "ping":
            ok, detail = True, "pong"
        elif command.action == "rollback":
            ok, detail = await self.reconciler.rollback()
        elif command.action == "reload":
            try:
                await self.reconciler.reload()
                ok, detail = True, "reloaded"
            except AutoGLMError as exc:
                ok, detail = False, str(exc)
        else:
            ok, detail = False, f"command {command.action!r} is not supported by this agent"
        return CommandReply(
            request_id=command.request_id, device_id=self.settings.device_id, ok=ok, detail=detail
        )

    async def _apply_config(self, pushed: EdgeConfig) -> None:
        """Pushed keys override edge.yaml's; a new thread count reloads the active model.

        A pushed ``router.cloud_url`` must be one this device allows (``fallback.allowed_urls``):
        prompts and the fallback key go nowhere else, whoever signed the push."""
        url = pushed.router.cloud_url
        if url is not None and not url_allowed(url, self.allowed_cloud_urls):
            raise ContractError(
                f"router.cloud_url {url!r} is not in this device's fallback.allowed_urls",
                allowed=", ".join(sorted(self.allowed_cloud_urls)) or "none",
            )
        new = ServingConfig.resolve(self.local_config, pushed)
        old, self.serving = self.serving, new
        self.host.queue_size = new.queue_size
        self.host.parallel = new.parallel
        self.host.batch_invariant = new.batch_invariant
        self.reconciler.threads = new.threads
        if new.reload_needed(old) and self.host.current is not None:
            # Called from within the reconciler (config step or restore): no lock to take here.
            await self.reconciler.reload_active()

    def capabilities(self) -> Capabilities:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        return Capabilities(
            providers=choose_providers(self.settings.runtime.providers),
            memory_bytes=memory,
            disk_free_bytes=shutil.disk_usage(self.settings.data_dir).free,
        )

    def installed_models(self) -> list[str]:
        """ "name:version@digest (slot)" of each model in a slot, the active one first."""
        s = self.reconciler.state
        slots = sorted(s.slots.items(), key=lambda kv: kv[0] != s.active_slot)
        return [
            f"{r.name}:{r.version}@{r.manifest_digest} (slot {slot})" for slot, r in slots if r is not None
        ]

    def reported_state(self, state: AgentState | None = None) -> ReportedState:
        s = state or self.reconciler.state
        return ReportedState(
            device_id=self.settings.device_id,
            revision=s.applied_revision,
            phase=s.phase,
            active_slot=s.active_slot,
            slots=dict(s.slots),
            last_error=s.last_error,
            capabilities=self.capabilities(),
            target_revision=s.target_revision if s.target is not None else -1,
            config_revision=s.config_revision,
            config_error=s.config_error,
            control_error=s.control_error,
            evaluation=s.evaluation,
            report_id=uuid.uuid4().hex,
        )

    async def _report(self, state: AgentState) -> None:
        self._report_now(state)

    def _report_now(self, state: AgentState) -> None:
        # Through the outbox: offline, reported states wait there, in order, for the reconnect.
        reported = self.reported_state(state)
        topic = self.topics.reported(self.settings.device_id)
        try:
            self.outbox.append_message(topic, reported.to_json(), retain=True, uid=reported.report_id)
        except (sqlite3.Error, OSError) as exc:
            # A full disk: the cloud must still hear about it. Sent directly, best effort (the next
            # report that can be stored supersedes it anyway).
            log.error("could not store the reported state in the outbox (%s); sending it directly", exc)
            direct = reported.model_copy(update={"report_id": None})
            self._background.spawn(self.link.publish(topic, direct.to_json(), retain=True), "direct-report")

    async def run(self) -> None:
        """Run the link, the outbox sender and the reconciler until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="mqtt-link")
                tg.create_task(self.sender.run(), name="outbox-sender")
                tg.create_task(self.reconciler.run(), name="reconciler")
        finally:
            self.outbox.close()
