"""The batch worker: runs journalled requests in the background, locally when idle, else in the cloud.

Four loops, owned by the app's lifespan:

- the local lane takes one ``pending_local`` request at a time, and only while the device is idle
  (``idle.IdleSignal``), so an interactive request waits at most for one batch request's
  generation; what the local side refuses goes where ``policy.after_local_refusal`` says;
- the cloud lane sends ``waiting_cloud`` requests (and pending ones, when the policy says so) to
  the cloud, several at once while it answers and one probe per backoff delay while it does not
  (``gate.CloudGate``); a request the cloud cannot take stays in the journal;
- the link watch retries the cloud at once when the MQTT link comes back online;
- the sweeper expires batches past their completion window and deletes expired files.

Every step reads the journal and writes its result there before the next, so a killed agent
resumes where it was; a request in flight at the kill runs again, and its result is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from edge_agent.batch.executor import Answer, ItemExecutor, refusal
from edge_agent.batch.gate import CloudGate
from edge_agent.batch.idle import IdleSignal
from edge_agent.batch.journal import BatchJournal, Item
from edge_agent.batch.policy import Lane, Verdict, after_local_refusal, lane_for_pending, waits_for_cloud
from edge_agent.batch.states import ItemState
from edge_agent.settings import BatchSettings
from shared.edge_config import RouterPolicy
from shared.errors import CloudUnavailable, EngineError, RequestError

log = logging.getLogger(__name__)

# How often a lane with nothing to do looks again (it is also woken by new batches).
POLL_S = 1.0
# After an unexpected error in a loop (a full disk, say), before it tries again.
ERROR_PAUSE_S = 5.0


class BatchWorker:
    def __init__(
        self,
        journal: BatchJournal,
        executor: ItemExecutor,
        *,
        policy: Callable[[], RouterPolicy],
        local_model: Callable[[], bool],
        idle: IdleSignal,
        online: Callable[[], bool],
        settings: BatchSettings,
    ) -> None:
        self.journal = journal
        self.executor = executor
        self.policy = policy
        self.local_model = local_model
        self.idle = idle
        self.online = online
        self.settings = settings
        self.gate = CloudGate(settings.cloud_retry_initial_s, settings.cloud_retry_max_s)
        self.served = {"local": 0, "cloud": 0}
        self._claimed: set[tuple[str, int]] = set()
        self._events: list[asyncio.Event] = []
        self._was_online = False

    def wake(self) -> None:
        """Something changed (a new batch, the link): every loop looks again now."""
        for event in self._events:
            event.set()

    def stats(self) -> dict[str, object]:
        return {
            **self.journal.unfinished(),
            "served": dict(self.served),
            "cloud_failures": self.gate.failures,
            "cloud_retry_in_s": round(self.gate.wait_s(), 1),
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop("local lane", self._local_step), name="batch-local")
            tg.create_task(self._loop("cloud lane", self._cloud_step), name="batch-cloud")
            tg.create_task(self._loop("link watch", self._link_step), name="batch-link-watch")
            tg.create_task(self._loop("sweeper", self._sweep_step), name="batch-sweeper")

    async def _loop(self, what: str, step: Callable[[], Awaitable[float]]) -> None:
        """Run ``step`` forever, sleeping the seconds it returns unless woken; an error in one
        step is logged and never ends the loop."""
        event = asyncio.Event()
        self._events.append(event)
        while True:
            event.clear()  # before the step: a wake() during it is not lost
            try:
                delay = await step()
            except Exception:
                log.exception("batch %s: unexpected error; trying again in %.0fs", what, ERROR_PAUSE_S)
                delay = ERROR_PAUSE_S
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel on 3.11
                        await event.wait()

    def _pending_lane(self, policy: RouterPolicy) -> Lane | None:
        return lane_for_pending(
            policy,
            local_model=self.local_model(),
            cloud_configured=self.executor.cloud_configured(),
            cloud_failing=not self.gate.ready(),
        )

    def _next(self, states: list[ItemState], limit: int) -> list[Item]:
        return self.journal.next_items(states, limit, frozenset(self._claimed))

    # -- the local lane --------------------------------------------------------------------------
    async def _local_step(self) -> float:
        policy = self.policy()
        if self._pending_lane(policy) is not Lane.LOCAL:
            return POLL_S
        found = self._next([ItemState.PENDING_LOCAL], 1)
        if not found:
            return POLL_S
        if not self.idle.idle():
            return max(0.05, self.idle.wait_s())
        item = found[0]
        self._claimed.add(item.key)
        try:
            return await self._serve_locally(item, policy)
        finally:
            self._claimed.discard(item.key)

    async def _serve_locally(self, item: Item, policy: RouterPolicy) -> float:
        try:
            result = await self.executor.run_local(item)
        except RequestError as exc:
            verdict = after_local_refusal(exc, policy, cloud_configured=self.executor.cloud_configured())
            if verdict is Verdict.RETRY:
                log.info("batch request %s/%d: not now (%s); later", *item.key, exc.message)
                return POLL_S
            if verdict is Verdict.CLOUD:
                self.journal.move(item, ItemState.WAITING_CLOUD)
                self.wake()
                return 0.0
            self._finish(item, refusal(item, exc, "local"))
            return 0.0
        except Exception as exc:
            # A bug must not make a request run forever: it fails, as a single request would (500).
            log.exception("batch request %s/%d failed locally", *item.key)
            self._finish(item, refusal(item, EngineError(f"internal error: {type(exc).__name__}"), "local"))
            return 0.0
        self._finish(item, result)
        return 0.0

    # -- the cloud lane --------------------------------------------------------------------------
    async def _cloud_step(self) -> float:
        policy = self.policy()
        if policy is RouterPolicy.LOCAL_ONLY:
            if self.journal.requeue_local():
                self.wake()
            return POLL_S
        if not self.gate.ready():
            return self.gate.wait_s()
        states = [ItemState.WAITING_CLOUD]
        if self._pending_lane(policy) is Lane.CLOUD:
            states.append(ItemState.PENDING_LOCAL)
        # While the cloud fails, one request probes it; while it answers, several go at once.
        items = self._next(states, 1 if self.gate.failing else self.settings.cloud_concurrency)
        if not items:
            return POLL_S
        keys = [i.key for i in items]
        self._claimed.update(keys)
        try:
            reached = await asyncio.gather(*(self._serve_in_cloud(i, policy) for i in items))
        finally:
            self._claimed.difference_update(keys)
        if any(reached):
            self.gate.success()
        else:
            delay = self.gate.failure(at_least_s=self.executor.cloud_retry_in())
            log.info(
                "batch: the cloud is unavailable (%d time(s) in a row); %d request(s) unfinished, next try in %.1fs",
                self.gate.failures,
                sum(self.journal.unfinished().values()),
                delay,
            )
        return 0.0

    async def _serve_in_cloud(self, item: Item, policy: RouterPolicy) -> bool:
        """Whether the cloud was reached (its answer, whatever it is, is the request's result)."""
        try:
            result = await self.executor.run_cloud(item)
        except CloudUnavailable:
            if item.state is ItemState.PENDING_LOCAL and waits_for_cloud(policy):
                self.journal.move(item, ItemState.WAITING_CLOUD)
            return False
        except RequestError as exc:
            self._finish(item, refusal(item, exc, "cloud"))
            return True
        self._finish(item, result)
        return True

    def _finish(self, item: Item, result: Answer) -> None:
        if not self.journal.finish(item, result.line, served_by=result.served_by):
            return  # final already (the batch was cancelled or expired meanwhile)
        self.served[result.served_by] += 1
        batch = self.journal.batch(item.batch_id)
        if batch.status == "completed":
            log.info("batch %s completed: %d answered, %d failed", batch.id, batch.completed, batch.failed)

    # -- housekeeping ----------------------------------------------------------------------------
    async def _link_step(self) -> float:
        online = self.online()
        if online and not self._was_online and self.gate.failing:
            log.info("batch: the MQTT link is back; trying the cloud now")
            self.gate.retry_now()
            self.wake()
        self._was_online = online
        return 0.5

    async def _sweep_step(self) -> float:
        expired = self.journal.expire()
        for batch_id in expired:
            log.warning("batch %s expired: its completion window passed before it finished", batch_id)
        files, batches = self.journal.sweep()
        if files or batches:
            log.info("batch: deleted %d expired file(s) and %d old batch(es)", files, batches)
        return self.settings.sweep_interval_s
