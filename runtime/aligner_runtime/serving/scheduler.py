"""Continuous batching: one decode batch that requests join at step boundaries and leave when done (issue 13).

One scheduler thread owns the backend and drives it over the graph interface of docs/architecture.md §5
(``backend._run(feeds) -> outputs``); clients submit from any thread or event loop and receive :class:`Event` s.

Every decode step runs the whole batch. Between two steps the scheduler

1. retires the rows that were cancelled or ran past their deadline;
2. admits waiting requests up to ``max_batch_size``. A joiner is prefilled alone (``prefill="alone"``, the default:
   the same call, bit for bit, as :meth:`Aligner.generate` makes for it) or with the other joiners, left-padded
   (``prefill="together"``), following the §5 protocol: a scoring prefill with ``steer_gate_in = -1``, then, when
   the export needs it (``two_pass_prefill``) and the row's gate fired, a steered second prefill with
   ``steer_gate_in = 1``; a row whose score is not finite is steered (fail closed, docs/contract.md);
3. picks each joiner's first token from its prefill logits and merges its KV cache into the batch. Rows share one
   past length: the shorter side is left-padded with zeros whose attention-mask entries are 0, so no row ever sees
   another's padding. Columns that every remaining row masks are trimmed when rows leave, so the past never grows
   beyond the longest live row.

On a decode step each row is fed its own decision (§5 rule 3) and its own positions (real tokens so far, as
``contract.position_ids`` counts them), so a row's tokens do not depend on its batch-mates: greedy output equals a run
alone, up to the last bits of the logits that ONNX Runtime's kernels may move with the batch shape.

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

from ..contract import (ATTENTION_MASK, GATE_DECIDE, GATE_IN, GATE_OUT, INPUT_IDS, INPUTS_EMBEDS, LOGITS,
                        NO_END_RULE, PAST, POSITION_IDS, PREFILL_MODES, SCORE_OUT, EndRule, Key, StrengthSchedule,
                        position_ids, prefill_decision, present_name)
from ..errors import AlignerError, check_count
from ..generate import SamplingConfig, check_token_ids, pick_token

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
                 listener: Callable[[Event], None] | None, scheduler: "Scheduler"):
        self.id = request_id
        self.prompt_ids = prompt_ids
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
    decision: float = 0.0
    last_token: int = -1
    decode_steps: int = 0
    generated: int = 0


class Scheduler:
    """Continuous batching over one backend (see the module docstring). Use :meth:`for_aligner`.

    ``max_batch_size``: rows decoded together. ``max_queue``: requests waiting for a row; past it :meth:`submit`
    raises :class:`QueueFull`. ``prefill``: ``"alone"`` or ``"together"``. ``strength``: the steering strength on a
    row's decode step ``t`` (``t = 1`` for its first; docs/contract.md), constant 1 when None. ``end_rule`` and
    ``end_token_ids``: how a steered row's answer ends (docs/contract.md "Ending a steered answer").
    """

    def __init__(self, backend, *, pad_token_id: int, two_pass: bool, context_length: int | None = None,
                 max_batch_size: int = 16, max_queue: int = 64, prefill: str = "alone",
                 strength: Callable[[int], float] | None = None, end_rule: EndRule = NO_END_RULE,
                 end_token_ids: Sequence[int] = (), name: str = "aligner-scheduler"):
        if GATE_IN not in backend.input_names:
            raise AlignerError("serving needs a steered export: this graph has no steering interface")
        if INPUTS_EMBEDS in backend.input_names:
            raise AlignerError("serving takes text-only exports; this language model takes inputs_embeds")
        if getattr(backend, "padding_side", "left") != "left":
            # GroupQueryAttention keeps each row's keys from position 0: the batch's masked left padding does not fit.
            raise AlignerError("serving takes graphs padded on the left; this graph's attention (GroupQueryAttention) "
                               "wants right padding, which the scheduler does not do yet")
        check_count(max_batch_size, "max_batch_size", 1, 4096)
        check_count(max_queue, "max_queue", 0, 1 << 20)
        if prefill not in PREFILL_MODES:
            raise AlignerError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
        check_token_ids([pad_token_id], backend.vocab_size, "pad token")
        self.backend = backend
        self.pad_token_id = int(pad_token_id)
        self.two_pass = bool(two_pass)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill = prefill
        self.strength = strength
        self.end_rule = end_rule
        self.end_token_ids = tuple(int(t) for t in end_token_ids)
        check_token_ids(self.end_token_ids, backend.vocab_size, "end token")
        self._past_inputs = [n for n in backend.input_names if PAST.match(n)]
        self._takes_positions = POSITION_IDS in backend.input_names
        self._past_specs = {n: backend.past_spec(n) for n in self._past_inputs}

        # The batch: rows in order, and arrays indexed by them.
        self._rows: list[_Row] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._past = {n: self._empty_past(0, 0, n) for n in self._past_inputs}
        self._positions = np.zeros(0, np.int64)

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
        """A scheduler for a loaded :class:`aligner_runtime.Aligner` (its backend, pad token, two-pass rule,
        context)."""
        if not aligner.steered:
            raise AlignerError("serving needs a steered export (this one was loaded with allow_unsteered)")
        if getattr(aligner, "image_encoder", None) is not None:
            raise AlignerError("serving takes text-only exports; this is a vision-language export")
        if aligner.manifest.get(Key.STRENGTH) and "strength" not in options:
            options["strength"] = StrengthSchedule.from_manifest(aligner.manifest[Key.STRENGTH]).at
        if aligner.manifest.get(Key.END_RULE) and "end_rule" not in options:
            options["end_rule"] = EndRule.from_manifest(aligner.manifest[Key.END_RULE])
            options.setdefault("end_token_ids", aligner.stop_token_ids)
        return cls(aligner._backend, pad_token_id=aligner.tokenizer.pad_token_id, two_pass=aligner.export.two_pass,
                   context_length=aligner.context_length, **options)

    # --- client side --------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], config: SamplingConfig, *, timeout: float | None = None,
               listener: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queues one tokenized prompt. Bad input raises :class:`AlignerError` here, in the caller's thread;
        a full queue raises :class:`QueueFull`. ``timeout``: seconds from now after which the request ends with
        ``finish_reason = "timeout"``."""
        ids = list(prompt_ids)
        if not ids:
            raise AlignerError("empty prompt")
        check_token_ids(ids, self.backend.vocab_size, "prompt token")
        ids = [int(t) for t in ids]
        if self.context_length is not None and len(ids) >= self.context_length:
            raise AlignerError(f"prompt is {len(ids)} tokens long; the model's context is {self.context_length} "
                               f"tokens and needs room for at least one new token")
        if not isinstance(config, SamplingConfig):
            raise AlignerError("config must be a SamplingConfig")
        config.validate(self.backend.vocab_size)
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
                                   None if timeout is None else time.monotonic() + timeout, listener, self)
            self._next_id += 1
            self._waiting.append(handle)
            self.counters["submitted"] += 1
            self._wake.notify()
        return handle

    def stats(self) -> dict:
        """A snapshot: rows decoding, requests waiting, and the running counters."""
        with self._lock:
            return {"active": len(self._rows), "waiting": len(self._waiting), "past_length": self._mask.shape[1],
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
        self._rows = []

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
                self._fail_all(f"generation failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

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
        rows, self._rows = self._rows, []
        self._reset_arrays()
        self.counters["failed"] += len(rows)
        for row in rows:
            if not row.handle.done:
                row.handle._emit(Event("error", message=message))

    def _reset_arrays(self) -> None:
        self._mask = np.zeros((0, 0), np.int64)
        self._past = {n: self._empty_past(0, 0, n) for n in self._past_inputs}
        self._positions = np.zeros(0, np.int64)

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

    # --- graph feeds --------------------------------------------------------------------------------------------------
    def _empty_past(self, batch: int, length: int, name: str) -> np.ndarray:
        heads, head_dim, dtype = self._past_specs[name]
        return np.zeros((batch, heads, length, head_dim), dtype=dtype)

    def _run(self, input_ids, attention_mask, positions, past, gate_in) -> dict[str, np.ndarray]:
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, GATE_IN: gate_in.astype(np.float32)}
        if self._takes_positions:
            feeds[POSITION_IDS] = positions
        feeds.update(past)
        return self.backend._run(feeds)

    # --- joining ------------------------------------------------------------------------------------------------------
    def _join(self, handles: list[RequestHandle]) -> None:
        groups = [[h] for h in handles] if self.prefill == "alone" else [handles]
        for group in groups:
            # Checked just before the prefill: earlier joiners' prefills may have taken a while.
            group = [h for h in group if not self._ended_before_prefill(h)]
            if not group:
                continue
            try:
                merged = self._prefill(group)
                if merged is not None:
                    self._merge(*merged)
            except Exception as exc:  # this group's prefill failed: its requests fail, the batch goes on
                log.exception("prefill failed")
                for handle in group:
                    if not handle.done:
                        self.counters["failed"] += 1
                        handle._emit(Event("error", message=f"prefill failed: {str(exc).splitlines()[0]}"))

    def _prefill(self, group: list[RequestHandle]):
        """§5 rules 1 and 2 for the joiners; emits each one's gate and first token. Returns the rows that go on
        with their mask, past and positions, or None."""
        now = time.monotonic()
        width = max(len(h.prompt_ids) for h in group)
        batch = len(group)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for b, handle in enumerate(group):
            handle.admitted = now
            input_ids[b, width - len(handle.prompt_ids):] = handle.prompt_ids
            mask[b, width - len(handle.prompt_ids):] = 1
        positions = position_ids(mask)
        empty = {n: self._empty_past(batch, 0, n) for n in self._past_inputs}
        outputs = self._run(input_ids, mask, positions, empty, np.full(batch, GATE_DECIDE, np.float32))
        self.counters["prefill_passes"] += 1
        logits = outputs[LOGITS][:, -1, :]
        past = {n: outputs[present_name(n)] for n in self._past_inputs}
        score = np.asarray(outputs[SCORE_OUT], dtype=np.float32).reshape(batch).copy()
        gate, fired = prefill_decision(outputs[GATE_OUT], score, self.two_pass)
        if fired.size:
            again = self._run(input_ids[fired], mask[fired], positions[fired],
                              {n: self._empty_past(fired.size, 0, n) for n in self._past_inputs},
                              np.ones(fired.size, np.float32))
            self.counters["prefill_passes"] += 1
            logits = logits.copy()
            logits[fired] = again[LOGITS][:, -1, :]
            for name in self._past_inputs:
                past[name] = past[name].copy()
                past[name][fired] = again[present_name(name)]

        keep, rows = [], []
        for b, handle in enumerate(group):
            config = handle.config
            budget = config.max_new_tokens if self.context_length is None else \
                min(config.max_new_tokens, self.context_length - len(handle.prompt_ids))
            row = _Row(handle, None if config.greedy else np.random.default_rng(config.seed), budget,
                       frozenset(config.stop_token_ids), decision=float(gate[b]))
            self.counters["admitted"] += 1
            self.counters["prompt_tokens"] += len(handle.prompt_ids)
            self.counters["gate_fired"] += int(row.decision > 0.5)
            handle._emit(Event("gate", gate=float(gate[b]), score=float(score[b])))
            if self._pick(row, logits[b]):
                keep.append(b)
                rows.append(row)
        if not keep:
            return None
        idx = np.asarray(keep)
        return rows, mask[idx], {n: v[idx] for n, v in past.items()}, np.asarray(
            [len(r.handle.prompt_ids) for r in rows], np.int64)

    def _merge(self, rows: list[_Row], mask: np.ndarray, past: dict, positions: np.ndarray) -> None:
        """Joins prefilled rows to the batch; the shorter past is left-padded with masked zeros."""
        if not self._rows:
            self._rows, self._mask, self._past, self._positions = rows, mask, past, positions
            return
        length = max(self._mask.shape[1], mask.shape[1])
        # Everything is built before anything is replaced: a failure leaves the batch as it was.
        merged_mask = np.concatenate([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)], axis=0)
        merged_past = {name: np.concatenate([_pad_left(self._past[name], length, 2), _pad_left(past[name], length, 2)],
                                            axis=0) for name in self._past_inputs}
        self._mask, self._past = merged_mask, merged_past
        self._positions = np.concatenate([self._positions, positions])
        self._rows = self._rows + rows

    # --- decoding -----------------------------------------------------------------------------------------------------
    def _pick(self, row: _Row, logits: np.ndarray) -> bool:
        """Picks the row's next token and emits it; False when the row is done."""
        if self.end_rule.active:  # the same rule as generate.GenerationRun: token index = tokens generated so far
            logits = self.end_rule.apply(logits, row.generated, row.decision, self.end_token_ids)
        token = pick_token(logits, row.handle.config, row.rng)
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
        batch = len(self._rows)
        tokens = np.asarray([[row.last_token] for row in self._rows], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        gate_in = np.empty(batch, np.float32)
        for i, row in enumerate(self._rows):
            row.decode_steps += 1
            # §5 rule 3: the decision latched at prefill, scaled by the strength schedule when the export has one.
            strength = 1.0 if self.strength is None else self.strength(row.decode_steps)
            gate_in[i] = np.float32(row.decision) * np.float32(strength)
        outputs = self._run(tokens, mask, self._positions[:, None], self._past, gate_in)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += batch
        self._mask = mask
        self._past = {n: outputs[present_name(n)] for n in self._past_inputs}
        self._positions = self._positions + 1
        logits = outputs[LOGITS][:, -1, :]
        keep = [i for i, row in enumerate(self._rows) if self._pick(row, logits[i])]
        if len(keep) < batch:
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Drops the other rows and the leading columns no remaining row attends to."""
        if not keep:
            self._rows = []
            self._reset_arrays()
            return
        idx = np.asarray(keep)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[idx]
        # Every row's mask is zeros then ones (left padding grows in lockstep), so the first column any row attends
        # to is the smallest count of leading zeros.
        start = int(np.min(np.argmax(mask, axis=1)))
        self._mask = mask[:, start:]
        self._past = {n: np.ascontiguousarray(v[idx][:, :, start:]) for n, v in self._past.items()}
        self._positions = self._positions[idx]


def _pad_left(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    """``array`` with zeros prepended along ``axis`` up to ``length``."""
    missing = length - array.shape[axis]
    if missing <= 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, array.dtype), array], axis=axis)
