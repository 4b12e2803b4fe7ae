"""Parallel slots: up to ``parallel`` requests decode together, one batched step for all of them.

Batch-1 decode on a CPU is bound by reading the weights; one step for four sequences reads them
once, so four streams together get several times the tokens per second of one (bench/RESULTS.md,
"parallel slots"), as llama.cpp's server does with ``--parallel``. Each request keeps its own
sampling state (:class:`~edge_agent.runtime.generator.Sequence`) and its own row of the KV
buffers, with that row's prefix cache. Newcomers are prefilled between two steps, then join the
batch: up to ``PREFILL_CHUNK`` prompt tokens per step, several short prompts or a piece of a long
one (the others wait a piece, not the whole prompt); a finished or abandoned request leaves it at once and its row is free for the
next in line. A request's output does not depend on what else is decoding (tests/test_parallel.py).

Graphs whose KV cache cannot be batched (concatenated caches, the CUDA provider for now) decode
one request at a time through the same loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.runtime.channel import GenerationChannel, Item, put_all
from edge_agent.runtime.generator import (
    PREFILL_CHUNK,
    GenerationParams,
    GenerationResult,
    Sequence,
    StreamItem,
    TextGenerator,
)
from edge_agent.runtime.session import Decoder

log = logging.getLogger(__name__)

# What the batcher reports per finished request: the result, its seconds from the start of its
# prefill, and the seconds after its first token (decode).
Recorder = Callable[[GenerationResult, float, float], None]


@dataclass
class _Job:
    seq: Sequence
    channel: GenerationChannel
    # Called once when the job leaves the batcher (finished, failed or abandoned).
    release: Callable[[], None]
    decoder: Decoder | None = None
    row: int = 0
    started: float = 0.0
    first: float | None = None


class DecodeBatcher:
    """Runs one model's requests on a thread of its own, started when work arrives and ended
    when none is left. ``submit`` from any thread; the rest runs on the batcher's thread."""

    def __init__(
        self,
        generator: TextGenerator,
        parallel: Callable[[], int],
        record: Recorder,
        add_busy: Callable[[float], None],
        invariant: Callable[[], bool] = lambda: False,
    ) -> None:
        self.generator = generator
        self.model = generator.model
        self._parallel = parallel
        self._record = record
        self._add_busy = add_busy
        self._invariant = invariant
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self.active = 0  # sequences decoding now (read by metrics)
        # What this pass of the loop produced for the readers, sent at its end in one hand-off.
        self._outbox: list[tuple[GenerationChannel, Item]] = []

    @property
    def invariant(self) -> bool:
        """Batch-invariant mode: every step runs an even number of rows (a lone sequence beside
        an idle row), so that a request's answer does not depend on what else is decoding; see
        :meth:`OnnxCausalLM.step_together`. Not needed (so not paid for) where the model's
        kernels compute every row alike whatever its company (the edge's own)."""
        return self.model.batches and self._invariant() and not self.model.rows_independent

    @property
    def width(self) -> int:
        """How many sequences may decode together now."""
        return max(1, self._parallel()) if self.model.batches else 1

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        channel: GenerationChannel,
        release: Callable[[], None],
    ) -> None:
        job = _Job(self.generator.sequence(prompt_ids, params), channel, release)
        with self._lock:
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
                self._thread.start()

    # -- the batcher's thread ------------------------------------------------------------------
    def _run(self) -> None:
        filling: deque[_Job] = deque()  # admitted, prompt not fully read yet
        active: list[_Job] = []  # decoding
        while True:
            admitted: list[_Job] = []
            with self._lock:
                while self._pending and len(active) + len(filling) + len(admitted) < self.width:
                    admitted.append(self._pending.popleft())
                if not active and not filling and not admitted:
                    self._thread = None
                    self.active = 0
                    return
            for job in admitted:
                if self._start(job, [*active, *filling]):
                    filling.append(job)
            began = time.perf_counter()
            self._fill(filling, active)
            self._flush()  # first tokens now, not after the step
            active = [job for job in active if not self._abandoned(job)]
            self.active = len(active) + len(filling)
            if active:
                active = self._step(active)
            # Counted again before the readers hear of it: a reader that has its final item sees
            # its request no longer among those generating.
            self.active = len(active) + len(filling)
            self._flush()
            self._add_busy(time.perf_counter() - began)

    def _fill(self, filling: deque[_Job], active: list[_Job]) -> None:
        """Read waiting prompts between two steps: whole pieces, in arrival order, at least one
        and as many as fit in PREFILL_CHUNK tokens. A long prompt delays the others by a piece;
        requests that arrive together with short prompts (a burst of chat turns) are all read
        before the next step and decode together from it, as llama.cpp's server batches its
        slots' prompts (one newcomer per step had the others' prompts read between the first
        one's decode steps). A piece is the job's own next PREFILL_CHUNK tokens whatever the
        company, so its answer does not depend on it."""
        read = 0
        while filling:
            job = filling[0]
            if self._abandoned(job):
                filling.popleft()
                continue
            piece = min(PREFILL_CHUNK, len(job.seq.pending))
            if read and read + piece > PREFILL_CHUNK:
                return
            read += piece
            if self._prefill(job):
                active.append(filling.popleft())
            elif job.seq.done:
                filling.popleft()
            else:
                return  # a long prompt: its next piece after the next step

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            put_all(outbox)

    def _abandoned(self, job: _Job) -> bool:
        if job.channel.cancelled.is_set():
            job.release()
            job.seq.done = True
            return True
        return False

    def _start(self, job: _Job, running: list[_Job]) -> bool:
        """Give ``job`` a free KV row (the one caching most of its prompt); whether it goes on."""
        if self._abandoned(job):
            return False
        job.started = time.perf_counter()
        seq = job.seq
        try:
            busy = frozenset(j.row for j in running)
            decoder = self.model.decoder(
                seq.capacity, seq.prompt_ids, busy=busy, rows=self.width, invariant=self.invariant
            )
            job.decoder = decoder
            job.row = getattr(decoder, "row", 0)
            items = seq.start(decoder.past_len)
        except BaseException as exc:
            self._fail(job, exc)
            return False
        return self._deliver(job, items)

    def _prefill(self, job: _Job) -> bool:
        """Feed the next piece of ``job``'s prompt; whether it has begun decoding (joins the batch).
        A job that finished or failed here is ``done``."""
        seq = job.seq
        assert job.decoder is not None
        try:
            feed = seq.pending[:PREFILL_CHUNK]
            if len(feed) == 1 and self.invariant:
                # One token to read (the rest came from the prefix cache): not a one-row step.
                logits = self.model.step_together([job.decoder], feed, invariant=True)
            else:
                logits = job.decoder.step(feed, last_only=True)
            if not seq.consumed(len(feed)):
                return False
            items = seq.advance(logits[-1])
        except BaseException as exc:
            self._fail(job, exc)
            return False
        return self._deliver(job, items)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        log.debug("generation failed", exc_info=True)
        job.seq.done = True
        self._outbox.append((job.channel, exc))
        job.release()

    def _step(self, active: list[_Job]) -> list[_Job]:
        """One batched decode step; the jobs still decoding after it."""
        decoders = [job.decoder for job in active]
        try:
            logits = self.model.step_together(
                [d for d in decoders if d is not None],
                [job.seq.pending[0] for job in active],
                self.invariant,
            )
        except BaseException as exc:
            log.warning("decode step failed for %d sequence(s): %s", len(active), exc)
            for job in active:
                self._fail(job, exc)
            return []
        return [
            job for job, row in zip(active, logits, strict=True) if self._deliver(job, job.seq.advance(row))
        ]

    def _deliver(self, job: _Job, items: list[StreamItem]) -> bool:
        """Send ``items`` to the job's reader; whether it goes on decoding."""
        if job.first is None and job.seq.generated:
            job.first = time.perf_counter()
        self._outbox.extend((job.channel, item) for item in items)
        if not job.seq.done:
            return True
        if job.seq.result is not None:
            end = time.perf_counter()
            self._record(job.seq.result, end - job.started, end - job.first if job.first else 0.0)
        job.release()
        return False
