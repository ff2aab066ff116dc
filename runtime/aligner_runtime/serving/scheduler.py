"""Continuous batching: one decode batch that requests join at step boundaries and leave when done (issue 13).

One scheduler thread owns the loaded graph and drives it with the step primitives of :mod:`aligner_runtime.generate`
(the same ones :meth:`Aligner.generate` runs on: :meth:`StepModel.prefill`, :meth:`StepModel.decode`,
:meth:`DecodeBatch.join` and :meth:`DecodeBatch.keep`); clients submit from any thread or event loop and receive
:class:`Event` s. It serves every export :meth:`Aligner.generate` runs: text-only and vision-language (a request
carries its prompt's embeddings, images merged), padded on the left or, for GroupQueryAttention graphs, on the
right with their shared KV buffer.

Every decode step runs the whole batch. Between two steps the scheduler

1. retires the rows that were cancelled or ran past their deadline;
2. admits waiting requests up to ``max_batch_size``. A joiner is prefilled alone (``prefill="alone"``, the default:
   the same call, bit for bit, as :meth:`Aligner.generate` makes for it) or with the other joiners, padded together
   (``prefill="together"``), following the §5 protocol (:meth:`StepModel.prefill`): a scoring prefill with
   ``steer_gate_in = -1``, then, when the export needs it (``two_pass_prefill``) and the row's gate fired, a steered
   second prefill with ``steer_gate_in = 1``; a row whose score is not finite is steered (fail closed,
   docs/contract.md);
3. picks each joiner's first token from its prefill logits and joins its rows to the batch
   (:meth:`DecodeBatch.join`): the shorter past gains zero columns whose attention-mask entries are 0, so no row ever
   sees another's padding. When rows leave (:meth:`DecodeBatch.keep`), the columns that no remaining row attends to
   are dropped, so the past never grows beyond the longest live row.

On a decode step each row is fed its own decision (§5 rule 3) scaled by the strength schedule at its own step, and
its own positions, so a row's tokens do not depend on its batch-mates: greedy output equals a run alone, up to the
last bits of the logits that ONNX Runtime's kernels may move with the batch shape.

A prompt's prefill holds the batch for its duration (no chunked prefill); the decode steps of the running rows wait.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..contract import CONSTANT_STRENGTH, NO_END_RULE, PREFILL_MODES, EndRule, StrengthSchedule
from ..errors import AlignerError, check_count
from ..generate import DecodeBatch, StepModel
from ..sampling import SamplingConfig
from ..schema import first_line

log = logging.getLogger("aligner_runtime.serving")

# Finish reasons: the two of the generation loop, and the two a server adds.
STOP, LENGTH, CANCELLED, TIMEOUT = "stop", "length", "cancelled", "timeout"


@dataclass(frozen=True)
class Event:
    """What a request hears, in order: one ``gate`` (after its prefill), a ``token`` per new token, then ``done``
    (with ``finish_reason``) or ``error`` (with ``message``)."""

    kind: str
    token: int | None = None
    gate: float | None = None
    score: float | None = None
    finish_reason: str | None = None
    message: str | None = None


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: come back in ``retry_after`` seconds (HTTP 503 + Retry-After)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class SchedulerClosed(Exception):
    """The scheduler has stopped (or is stopping) and takes no more requests."""


class RequestHandle:
    """One submitted request. The scheduler thread fills it; any thread may read it once :attr:`done` is set, iterate
    :meth:`events`, or :meth:`cancel` it. With a ``listener`` (a callable taking an :class:`Event`, called on the
    scheduler thread: keep it short), events go there instead of the internal queue."""

    def __init__(self, request_id: int, prompt_ids: list[int], config: SamplingConfig, deadline: float | None,
                 listener: Callable[[Event], None] | None, scheduler: "Scheduler",
                 prompt_embeds: np.ndarray | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.prompt_embeds = prompt_embeds  # a vision-language prompt's embeddings, images merged (or None)
        self.config = config
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self.gate: float | None = None
        self.score: float | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._listener = listener
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if listener is None else None
        self._done = threading.Event()
        self._cancelled = False
        self._scheduler = scheduler

    # --- client side --------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stops the request at the next step boundary (``finish_reason = "cancelled"``); a finished request is
        left as it is."""
        if not self._cancelled and not self.done:
            self._cancelled = True
            self._scheduler._withdraw(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events as they come, ending with ``done`` or ``error``. ``timeout``: the longest wait for
        one event (``TimeoutError`` past it). Only for a handle made without a listener."""
        if self._events is None:
            raise RuntimeError("this request delivers its events to its listener")
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event for {timeout} s") from None
            yield event
            if event.kind in ("done", "error"):
                return

    # --- scheduler side -----------------------------------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        now = time.monotonic()
        if event.kind == "gate":
            self.gate, self.score = event.gate, event.score
        elif event.kind == "token":
            self.token_ids.append(event.token)
            if self.first_token is None:
                self.first_token = now
        elif event.kind == "done":
            self.finish_reason = event.finish_reason
        elif event.kind == "error":
            self.error = event.message
        final = event.kind in ("done", "error")
        if final:
            self.finished = now
        try:
            if self._listener is not None:
                self._listener(event)
            else:
                self._events.put(event)
        except Exception:  # a failing listener (a closed connection) must not stop the scheduler
            log.exception("request %s: the event listener failed; cancelling the request", self.id)
            self._cancelled = True
        if final:
            self._done.set()


@dataclass
class _Row:
    """A request in the batch: what the loop needs to pick its tokens and know when it ends."""

    handle: RequestHandle
    rng: np.random.Generator | None
    budget: int
    stops: frozenset
    last_token: int = -1
    generated: int = 0


class Scheduler:
    """Continuous batching over one loaded graph (see the module docstring). Use :meth:`for_aligner`, or pass a
    :class:`~aligner_runtime.generate.StepModel`, or a backend with the step model's options (``pad_token_id``,
    ``two_pass``, ``context_length``, ``embedder``, ``strength``, ``end_rule``, ``end_token_ids``).

    ``max_batch_size``: rows decoded together. ``max_queue``: requests waiting for a row; past it :meth:`submit`
    raises :class:`QueueFull`. ``prefill``: ``"alone"`` or ``"together"``. ``strength``: the steering strength on a
    row's decode step ``t`` (``t = 1`` for its first; docs/contract.md), a schedule or a function of ``t``; constant
    1 when None. ``end_rule`` and ``end_token_ids``: how a steered row's answer ends (docs/contract.md "Ending a
    steered answer").
    """

    def __init__(self, model, *, pad_token_id: int | None = None, two_pass: bool | None = None,
                 context_length: int | None = None, embedder=None, max_batch_size: int = 16, max_queue: int = 64,
                 prefill: str = "alone", strength: StrengthSchedule | Callable[[int], float] | None = None,
                 end_rule: EndRule = NO_END_RULE, end_token_ids: Sequence[int] = (), name: str = "aligner-scheduler"):
        if not isinstance(model, StepModel):
            if pad_token_id is None or two_pass is None:
                raise AlignerError("a scheduler over a backend needs pad_token_id and two_pass")
            model = StepModel(model, pad_token_id=pad_token_id, two_pass=two_pass, context_length=context_length,
                              embedder=embedder, strength=CONSTANT_STRENGTH if strength is None else strength,
                              end_rule=end_rule, end_token_ids=end_token_ids)
        if not model.steered:
            raise AlignerError("serving needs a steered export: this graph has no steering interface")
        check_count(max_batch_size, "max_batch_size", 1, 4096)
        check_count(max_queue, "max_queue", 0, 1 << 20)
        if prefill not in PREFILL_MODES:
            raise AlignerError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
        self.model = model
        self.backend = model.backend
        self.context_length = model.context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill = prefill

        # The batch: rows in order, and the step primitives' state of the same rows.
        self._rows: list[_Row] = []
        self._batch: DecodeBatch | None = None

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._next_id = 0
        self._joining = 0  # requests taken from the queue and being prefilled
        self._stopping = False
        self._mean_seconds = 1.0  # a moving mean of request durations, for Retry-After
        self.counters = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def for_aligner(cls, aligner, **options) -> "Scheduler":
        """A scheduler for a loaded :class:`aligner_runtime.Aligner`: its step model (backend, pad token, two-pass
        rule, context, the embedding graph of a vision-language export, strength schedule and end rule)."""
        if not aligner.steered:
            raise AlignerError("serving needs a steered export (this one was loaded with allow_unsteered)")
        strength = options.pop("strength", None)
        model = aligner.step_model()
        return cls(model if strength is None else model.with_strength(strength), **options)

    # --- client side --------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], config: SamplingConfig, *, timeout: float | None = None,
               listener: Callable[[Event], None] | None = None,
               prompt_embeds: np.ndarray | None = None) -> RequestHandle:
        """Queues one tokenized prompt. Bad input raises :class:`AlignerError` here, in the caller's thread;
        a full queue raises :class:`QueueFull`. ``timeout``: seconds from now after which the request ends with
        ``finish_reason = "timeout"``. ``prompt_embeds``: a vision-language prompt's embeddings with its images
        merged (``Aligner.prompt_embeds``), one row per token; None for a prompt without images."""
        ids = self.model.check_prompt(prompt_ids)
        if not isinstance(config, SamplingConfig):
            raise AlignerError("config must be a SamplingConfig")
        config.validate(self.model.vocab_size)
        if prompt_embeds is not None:
            prompt_embeds = np.asarray(prompt_embeds)
        self.model.check_embeds(ids, prompt_embeds)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise AlignerError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                raise SchedulerClosed("the scheduler is closed")
            # Requests that a free row will take at the next boundary do not count against the queue.
            free = max(0, self.max_batch_size - len(self._rows) - self._joining)
            if len(self._waiting) >= self.max_queue + free:
                self.counters["rejected"] += 1
                raise QueueFull(len(self._waiting), self._retry_after())
            handle = RequestHandle(self._next_id, ids, config,
                                   None if timeout is None else time.monotonic() + timeout, listener, self,
                                   prompt_embeds)
            self._next_id += 1
            self._waiting.append(handle)
            self.counters["submitted"] += 1
            self._wake.notify()
        return handle

    def stats(self) -> dict:
        """A snapshot: rows decoding, requests waiting, and the running counters."""
        with self._lock:
            return {"active": len(self._rows), "waiting": len(self._waiting), "past_length": self._past_length(),
                    "alive": self._thread.is_alive() and not self._stopping, **self.counters}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops the thread after the current step; requests still waiting or running end with an ``error``."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting + [row.handle for row in self._rows]:
            if not handle.done:
                handle._emit(Event("error", message="the server is shutting down"))
        self._rows, self._batch = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request still waiting leaves the queue now; one in the batch leaves at the next boundary."""
        with self._lock:
            try:
                self._waiting.remove(handle)
            except ValueError:
                self._wake.notify()
                return
        self.counters["cancelled"] += 1
        handle._emit(Event("done", finish_reason=CANCELLED))

    def _retry_after(self) -> int:
        """Seconds until a row is likely free: the queue ahead, at the batch's rate, at the mean request duration."""
        batches = (len(self._waiting) + len(self._rows) + self._joining) / self.max_batch_size
        return max(1, min(600, math.ceil(batches * self._mean_seconds)))

    # --- the scheduler thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    return
                expired = self._expired_waiting()
                free = self.max_batch_size - len(self._rows)
                joiners = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                self._joining = len(joiners)
            for handle in expired:
                self._finish_handle(handle, TIMEOUT)
            try:
                self._retire()
                if joiners:
                    self._join(joiners)
                with self._lock:
                    self._joining = 0
                if self._rows:
                    self._step()
            except Exception as exc:  # the backend failed: the rows of this step fail, the server stays up
                log.exception("scheduler step failed")
                self._fail_all(f"generation failed: {first_line(exc)}")

    def _expired_waiting(self) -> list[RequestHandle]:
        now = time.monotonic()
        expired = [h for h in self._waiting if h.deadline is not None and now >= h.deadline]
        for handle in expired:
            self._waiting.remove(handle)
        return expired

    def _ended_before_prefill(self, handle: RequestHandle) -> bool:
        if handle.cancelled:
            self._finish_handle(handle, CANCELLED)
            return True
        if handle.deadline is not None and time.monotonic() >= handle.deadline:
            self._finish_handle(handle, TIMEOUT)
            return True
        return False

    def _finish_handle(self, handle: RequestHandle, reason: str) -> None:
        self.counters[{CANCELLED: "cancelled", TIMEOUT: "timed_out"}.get(reason, "completed")] += 1
        if reason in (STOP, LENGTH):
            seconds = time.monotonic() - handle.submitted
            self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * seconds
        handle._emit(Event("done", finish_reason=reason))

    def _fail_all(self, message: str) -> None:
        rows, self._rows, self._batch = self._rows, [], None
        self.counters["failed"] += len(rows)
        for row in rows:
            if not row.handle.done:
                row.handle._emit(Event("error", message=message))

    def _past_length(self) -> int:
        return 0 if self._batch is None else int(self._batch.mask.shape[1])

    def _retire(self) -> None:
        """Rows cancelled or past their deadline leave before the next step."""
        now = time.monotonic()
        reasons = {}
        for i, row in enumerate(self._rows):
            if row.handle.cancelled:
                reasons[i] = CANCELLED
            elif row.handle.deadline is not None and now >= row.handle.deadline:
                reasons[i] = TIMEOUT
        if reasons:
            for i, reason in reasons.items():
                self._finish_handle(self._rows[i].handle, reason)
            self._keep([i for i in range(len(self._rows)) if i not in reasons])

    # --- joining ------------------------------------------------------------------------------------------------------
    def _join(self, handles: list[RequestHandle]) -> None:
        groups = [[h] for h in handles] if self.prefill == "alone" else [handles]
        for group in groups:
            # Checked just before the prefill: earlier joiners' prefills may have taken a while.
            group = [h for h in group if not self._ended_before_prefill(h)]
            if not group:
                continue
            try:
                joined = self._prefill(group)
                if joined is not None:
                    rows, batch = joined
                    # Built before anything is replaced: a failure leaves the batch as it was.
                    merged = batch if self._batch is None else DecodeBatch.join([self._batch, batch])
                    self._batch, self._rows = merged, self._rows + rows
            except Exception as exc:  # this group's prefill failed: its requests fail, the batch goes on
                log.exception("prefill failed")
                for handle in group:
                    if not handle.done:
                        self.counters["failed"] += 1
                        handle._emit(Event("error", message=f"prefill failed: {first_line(exc)}"))

    def _prefill(self, group: list[RequestHandle]):
        """§5 rules 1 and 2 for the joiners (:meth:`StepModel.prefill`); emits each one's gate and first token.
        Returns the rows that go on and their :class:`DecodeBatch`, or None."""
        now = time.monotonic()
        model = self.model
        for handle in group:
            handle.admitted = now
        budgets = [model.budget(h.config, len(h.prompt_ids)) for h in group]
        embeds = [h.prompt_embeds for h in group]
        prompts = model.pad([h.prompt_ids for h in group], embeds if any(e is not None for e in embeds) else None)
        # A shared KV buffer holds the padded prompt and the longest answer of the group.
        done = model.prefill(prompts, capacity=prompts.input_ids.shape[1] + max(budgets))
        self.counters["prefill_passes"] += done.passes

        keep, rows = [], []
        for b, handle in enumerate(group):
            config = handle.config
            row = _Row(handle, None if config.greedy else np.random.default_rng(config.seed), budgets[b],
                       frozenset(config.stop_token_ids))
            self.counters["admitted"] += 1
            self.counters["prompt_tokens"] += len(handle.prompt_ids)
            self.counters["gate_fired"] += int(done.gate[b] > 0.5)
            handle._emit(Event("gate", gate=float(done.gate[b]), score=float(done.score[b])))
            if self._pick(row, done.logits[b], done.gate[b]):
                keep.append(b)
                rows.append(row)
        if not keep:
            return None
        return rows, done.rows if len(keep) == len(group) else done.rows.keep(keep)

    # --- decoding -----------------------------------------------------------------------------------------------------
    def _pick(self, row: _Row, logits: np.ndarray, decision: float) -> bool:
        """Picks the row's next token and emits it; False when the row is done."""
        token = self.model.pick(logits, row.generated, decision, row.handle.config, row.rng)
        row.last_token = token
        row.generated += 1
        self.counters["tokens"] += 1
        row.handle._emit(Event("token", token=token))
        if token in row.stops:
            self._finish_handle(row.handle, STOP)
            return False
        if row.generated >= row.budget:
            self._finish_handle(row.handle, LENGTH)
            return False
        if row.handle.cancelled:
            self._finish_handle(row.handle, CANCELLED)
            return False
        return True

    def _step(self) -> None:
        batch = self._batch
        logits = self.model.decode(batch, np.asarray([row.last_token for row in self._rows], np.int64))
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(self._rows)
        keep = [i for i, row in enumerate(self._rows) if self._pick(row, logits[i], batch.decision[i])]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Drops the other rows (and the past columns no remaining row attends to: :meth:`DecodeBatch.keep`)."""
        if not keep:
            self._rows, self._batch = [], None
            return
        self._batch = self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
