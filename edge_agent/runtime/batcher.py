"""Parallel slots: up to ``parallel`` requests decode together, one batched step for all of them.

Batch-1 decode on a CPU is bound by reading the weights; one step for four sequences reads them
once, so four streams together get several times the tokens per second of one (bench/RESULTS.md,
"parallel slots"), as llama.cpp's server does with ``--parallel``. Each request keeps its own
sampling state (:class:`~edge_agent.runtime.generator.Sequence`) and its own row of the KV
buffers, with that row's prefix cache. Newcomers are prefilled between two steps, then join the
batch: up to ``PREFILL_CHUNK`` prompt tokens per step, several short prompts or a piece of a long
one (the others wait a piece, not the whole prompt), short ones of about one length in one run
where the model can (:meth:`OnnxCausalLM.prefill_together`); a finished or abandoned request
leaves it at once and its row is free for the next in line. A batcher starting from idle first
waits briefly for requests still on their way (:meth:`DecodeBatcher.arriving`), so that requests
sent together start together. A request's output does not depend on what else is decoding
(tests/test_parallel.py).

Graphs whose KV cache cannot be batched (concatenated caches, the CUDA provider for now) decode
one request at a time through the same loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edge_agent.runtime.channel import GenerationChannel, Item, put_all
from edge_agent.runtime.generator import (
    PREFILL_CHUNK,
    GenerationResult,
    Sequence,
    StreamItem,
    TextGenerator,
)
from edge_agent.runtime.session import Decoder

log = logging.getLogger(__name__)

# How long a batcher starting from idle waits for requests still on their way (being tokenized)
# before it reads the prompts it has: a short prompt is tokenized in well under a millisecond, and
# a prefill takes several. A request with no other on its way does not wait.
GATHER_S = 0.005

# What the batcher reports per finished request: the result, its seconds from the start of its
# prefill, and the seconds after its first token (decode).
Recorder = Callable[[GenerationResult, float, float], None]


@dataclass(eq=False)  # a job is itself: the batcher finds and removes jobs by identity
class _Job:
    seq: Sequence
    channel: GenerationChannel
    # Called once when the job leaves the batcher (finished, failed or abandoned).
    release: Callable[[], None]
    decoder: Decoder | None = None
    row: int = 0
    started: float = 0.0
    first: float | None = None

    @property
    def piece(self) -> list[int]:
        """The prompt tokens its next prefill reads: a piece of at most PREFILL_CHUNK."""
        return self.seq.pending[:PREFILL_CHUNK]


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
        gather_s: float = GATHER_S,
    ) -> None:
        self.generator = generator
        self.model = generator.model
        self._parallel = parallel
        self._record = record
        self._add_busy = add_busy
        self._invariant = invariant
        self.gather_s = gather_s
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._arriving = 0  # requests on their way to submit (see arriving)
        self._arrived = threading.Condition(self._lock)
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

    def submit(self, seq: Sequence, channel: GenerationChannel, release: Callable[[], None]) -> None:
        """Queue ``seq`` (made by ``generator.sequence``); its items go to ``channel``."""
        job = _Job(seq, channel, release)
        with self._lock:
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
                self._thread.start()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's way to :meth:`submit` (its prompt being tokenized): a batcher that
        starts from idle waits, up to ``gather_s``, for requests on their way, so that requests
        arriving together have their prompts read in one run and decode together from their
        first step. Without it, whichever came first was prefilled alone while the others were
        still being tokenized, and its first steps ran alone; the others' prompts were read after
        its first token, between its steps (bench/edge_parallel.py, "not gathered")."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1
                self._arrived.notify_all()

    # -- the batcher's thread ------------------------------------------------------------------
    def _run(self) -> None:
        filling: deque[_Job] = deque()  # admitted, prompt not fully read yet
        active: list[_Job] = []  # decoding
        while True:
            admitted: list[_Job] = []
            with self._lock:
                if not active and not filling:
                    self._gather()
                self._withdraw_abandoned()
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

    def _withdraw_abandoned(self) -> None:
        """(Lock held.) Waiting requests whose client left: out of the queue at this step, not
        when a row frees for them (their places held, newcomers got 429s meanwhile)."""
        if any(job.channel.cancelled.is_set() for job in self._pending):
            self._pending = deque(job for job in self._pending if not self._abandoned(job))

    def _gather(self) -> None:
        """Starting from idle (lock held): wait for the requests on their way, while rows are free."""
        deadline = time.monotonic() + self.gather_s
        while self._arriving and len(self._pending) < self.width:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.wait(left)

    def _fill(self, filling: deque[_Job], active: list[_Job]) -> None:
        """Read waiting prompts between two steps: whole pieces, taken in arrival order, at least
        one and as many as fit in PREFILL_CHUNK tokens. A long prompt delays the others by a
        piece; requests that arrive together with short prompts (a burst of chat turns) are all
        read before the next step and decode together from it, as llama.cpp's server batches its
        slots' prompts (one newcomer per step had the others' prompts read between the first
        one's decode steps). The pieces taken are read in runs of adjacent rows (_groups). A
        piece is the job's own next PREFILL_CHUNK tokens whatever the company, and a run computes
        each row as it is computed alone (:meth:`OnnxCausalLM.prefill_together`), so its answer
        does not depend on the company."""
        jobs: list[_Job] = []
        read = 0
        for job in list(filling):
            if self._abandoned(job):
                filling.remove(job)
                continue
            piece = len(job.piece)
            if read and read + piece > PREFILL_CHUNK:
                break
            read += piece
            jobs.append(job)
            if piece < len(job.seq.pending):
                break  # a long prompt: its next piece after the next step, and the rest after it
        for group in _groups(jobs):
            joined = self._prefill(group)
            for job in group:
                if job in joined:
                    filling.remove(job)
                    active.append(job)
                elif job.seq.done:
                    filling.remove(job)

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

    def _prefill(self, group: list[_Job]) -> list[_Job]:
        """Feed the next piece of each job's prompt, in one run where the model can (adjacent
        rows, see :func:`_groups`); the jobs that have begun decoding (join the batch). A job
        that finished or failed here is ``done``."""
        feeds = [job.piece for job in group]
        decoders = [job.decoder for job in group]
        try:
            together = (
                self.model.prefill_together([d for d in decoders if d is not None], feeds)
                if len(group) > 1 and None not in decoders
                else None
            )
        except BaseException as exc:
            log.warning("prefill failed for %d sequence(s): %s", len(group), exc)
            for job in group:
                self._fail(job, exc)
            return []
        joined = []
        for i, (job, feed) in enumerate(zip(group, feeds, strict=True)):
            seq = job.seq
            assert job.decoder is not None
            try:
                if together is not None:
                    logits = together[i : i + 1]
                elif len(feed) == 1 and self.invariant:
                    # One token to read (the rest came from the prefix cache): not a one-row step.
                    logits = self.model.step_together([job.decoder], feed, invariant=True)
                else:
                    logits = job.decoder.step(feed, last_only=True)
                if not seq.consumed(len(feed)):
                    continue
                items = seq.advance(logits[-1])
            except BaseException as exc:
                self._fail(job, exc)
                continue
            if self._deliver(job, items):
                joined.append(job)
        return joined

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
        going = []
        for job, row in zip(active, logits, strict=True):
            try:
                items = job.seq.advance(row)
            except BaseException as exc:  # this sequence's own failure (its grammar): not the others'
                self._fail(job, exc)
                continue
            if self._deliver(job, items):
                going.append(job)
        return going

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


# A run of several prompt pieces pads each to the longest (and projects onto the vocabulary the
# positions from the shortest piece's last one on, in every row). A run's fixed cost (the weights
# read, tasks handed out) was worth 11 (int4), 21 (int8) and 30 (fp32) tokens of a SmolLM2 prefill
# on an Intel Xeon VM (bench/RESULTS.md): up to this many padding tokens per run saved, one run wins.
_PADDING_PER_RUN = 16


def _groups(jobs: list[_Job]) -> list[list[_Job]]:
    """The pieces to read in one run each: jobs on adjacent KV rows whose pieces are of about
    one length (a newcomers' burst of chat turns), each other job alone."""
    groups: list[list[_Job]] = []
    for job in sorted(jobs, key=lambda j: j.row):
        last = groups[-1] if groups else None
        if last is not None and job.row == last[-1].row + 1:
            sizes = [len(j.piece) for j in (*last, job)]
            if len(sizes) * max(sizes) - sum(sizes) <= _PADDING_PER_RUN * (len(sizes) - 1):
                last.append(job)
                continue
        groups.append([job])
    return groups
