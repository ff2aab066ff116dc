"""The one generation loop, shared by every backend and by the serving scheduler (docs/architecture.md §5, runtime
protocol; docs/runtime.md "The step primitives").

A backend only runs one forward step: ``backend._run(feeds) -> outputs`` over the graph interface (private: it takes
any ``steer_gate_in``, so only this module calls it)

    input_ids [B,S] i64, attention_mask [B,T] i64, position_ids [B,S] i64 (if the graph has it),
    past_key_values.{i}.key/.value [B,kvh,P,hd], steer_gate_in [B] f32
    -> logits [B,S,V], present.{i}.key/.value [B,kvh,T,hd], steer_gate [B], steer_score [B]

A vision-language export's language model takes ``inputs_embeds [B,S,H]`` instead of ``input_ids``; the run then
embeds tokens with ``embedder`` (the export's embedding graph) and takes each prompt's embeddings, images merged,
from ``prompt_embeds`` (``aligner_runtime.multimodal``).

Everything else is here, as step primitives on :class:`StepModel` (the loaded graph as the loop sees it) that both
:class:`GenerationRun` (one call's batch) and ``serving.scheduler`` (continuous batching) are built on:

- :meth:`StepModel.pad`: a padded prompt batch (left, or right where the graph wants it);
- :meth:`StepModel.prefill`: the scoring prefill and, by the two-pass rule, the steered second prefill of the rows
  whose gate fired; it returns each row's first logits, its decision and score, and a :class:`DecodeBatch`;
- :meth:`StepModel.decode`: one decode step over a :class:`DecodeBatch`, each row fed its own decision scaled by the
  strength schedule at its own step, and its own positions;
- :meth:`DecodeBatch.keep` (rows leave; columns no row attends to are dropped) and :meth:`DecodeBatch.join` (rows of
  different past lengths decode together);
- :meth:`StepModel.pick`: the end rule and greedy or seeded sampling for one row.

The KV cache is an object of the batch (:class:`NumpyKV` by default: the presents come back as numpy arrays and are
fed as the next step's past). A backend with ``kv_cache(batch, capacity)`` (ONNX Runtime) gives its own: the cache
stays in buffers that the backend binds as past and present (I/O binding), so nothing goes through numpy per step,
and graphs whose attention shares past and present (GroupQueryAttention) write each step's keys into a buffer
preallocated for the whole generation (``contiguous``: each row's keys from position 0, so only the mask's row sums
matter). Such a backend's ``_run`` finds the cache in ``feeds[KV_FEED]`` and updates it in place. A backend's
``padding_side`` (default ``left``) says how its graph wants a batch padded.

Thread safety: all loop state lives in one :class:`GenerationRun` (or one scheduler) per call, so concurrent calls
share nothing but the backend; each backend documents whether its ``run`` may be called concurrently (ONNX Runtime's
may, the TensorRT backend serialises its steps with a lock).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from .contract import (ATTENTION_MASK, CONSTANT_STRENGTH, GATE_DECIDE, GATE_IN, GATE_OUT, INPUTS_EMBEDS, INPUT_IDS,
                       LOGITS, NO_END_RULE, POSITION_IDS, SCORE_OUT, EndRule, StrengthSchedule, is_past,
                       position_ids, prefill_decision, present_name)
from .errors import AlignerError
from .sampling import MAX_NEW_TOKENS, SamplingConfig, check_token_ids, filter_logits, pick_token  # noqa: F401

KV_FEED = "__kv_cache__"  # feeds key under which the loop hands a backend its own KV cache object
# Upper bound on the prefill's logits array; a long prompt batch is prefilled in groups of rows below it.
PREFILL_LOGITS_BYTES = 256 * 2 ** 20
LEFT, RIGHT = "left", "right"  # padding sides


class Backend(Protocol):
    """One forward step of an exported graph. See the module docstring for the tensors."""

    input_names: list[str]
    output_names: list[str]
    vocab_size: int | None

    def past_spec(self, name: str) -> tuple[int, int, np.dtype]:
        """``(kv_heads, head_dim, dtype)`` of the past input ``name``."""

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


@dataclass
class RowResult:
    """One prompt's generation. ``gate``/``score`` are None for a model loaded with ``allow_unsteered``."""

    token_ids: list[int]
    prompt_tokens: int
    gate: float | None
    score: float | None
    finish_reason: str = "length"  # "stop" (a stop token) or "length" (max_new_tokens or the context)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RunTiming:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prefill_passes: int = 0  # 2 when the §5 second, steered prefill ran for some rows


def _pad_columns(array: np.ndarray, width: int, side: str) -> np.ndarray:
    """``array`` with zeros added along axis 2 (a cache) or 1 (a mask) on ``side`` up to ``width`` columns."""
    axis = 2 if array.ndim == 4 else 1
    missing = width - array.shape[axis]
    if missing <= 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    zeros = np.zeros(shape, array.dtype)
    return np.concatenate([zeros, array] if side == LEFT else [array, zeros], axis=axis)


class NumpyKV:
    """The KV cache as numpy arrays ``[B, kv_heads, T, head_dim]``: fed as ``past_key_values.*``, replaced by the
    ``present.*`` outputs after each step. For backends without a cache of their own (TensorRT, test doubles).
    Column ``j`` of the cache is column ``j`` of the attention mask."""

    bound = False
    contiguous = False

    def __init__(self, past: dict[str, np.ndarray]):
        self.past = past

    @classmethod
    def empty(cls, backend, names: list[str], batch: int) -> "NumpyKV":
        past = {}
        for name in names:
            heads, head_dim, dtype = backend.past_spec(name)
            past[name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
        return cls(past)

    def feed(self, feeds: dict) -> None:
        feeds.update(self.past)

    def take(self, outputs: dict) -> None:
        self.past = {name: outputs[present_name(name)] for name in self.past}

    def keep(self, rows, drop: int = 0) -> "NumpyKV":
        """The cache of ``rows``, without its first ``drop`` columns."""
        idx = np.asarray(rows, dtype=np.int64)
        return NumpyKV({k: np.ascontiguousarray(v[idx][:, :, drop:]) if drop else v[idx]
                        for k, v in self.past.items()})

    def replace_rows(self, rows, other: "NumpyKV") -> None:
        for name, value in other.past.items():
            self.past[name] = self.past[name].copy()
            self.past[name][rows] = value

    @classmethod
    def join(cls, parts: list["NumpyKV"], side: str = LEFT) -> "NumpyKV":
        """The rows of every part, in order; a shorter part gains masked zero columns on ``side``."""
        if len(parts) == 1:
            return parts[0]
        width = max(next(iter(p.past.values())).shape[2] for p in parts) if parts[0].past else 0
        return cls({k: np.concatenate([_pad_columns(p.past[k], width, side) for p in parts], axis=0)
                    for k in parts[0].past})


@dataclass
class PromptBatch:
    """A padded prompt batch: ``input_ids``/``attention_mask``/``positions`` ``[B, S]``, ``embeds`` ``[B, S, H]``
    for a graph that takes ``inputs_embeds`` (else None), and each row's prompt length."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    embeds: np.ndarray | None
    lengths: np.ndarray

    def rows(self, idx) -> "PromptBatch":
        return PromptBatch(self.input_ids[idx], self.attention_mask[idx], self.positions[idx],
                           None if self.embeds is None else self.embeds[idx], self.lengths[idx])

    @property
    def last_positions(self) -> np.ndarray:
        """Each row's last real column (the last column when padded on the left)."""
        width = self.attention_mask.shape[1]
        return width - 1 - np.argmax(self.attention_mask[:, ::-1], axis=1)


class DecodeBatch:
    """Rows decoding together: per row its attention mask ``[B, T]``, its real tokens so far (``lengths``, also its
    next position id), its latched decision (§5 rule 3), its decode steps (for the strength schedule) and the KV
    cache of all rows.

    A cache whose columns are the mask's keeps the mask's real layout: padding on the graph's side, zeros where a
    joined row had no token yet. A ``contiguous`` cache (GroupQueryAttention's shared buffer: each row's keys from
    position 0) only needs each row's count, so its mask is rebuilt from ``lengths``, as wide as the longest row."""

    def __init__(self, mask: np.ndarray, lengths: np.ndarray, decision: np.ndarray, cache, side: str,
                 steps: np.ndarray | None = None):
        self.mask = mask
        self.lengths = np.asarray(lengths, np.int64)
        self.decision = np.asarray(decision, np.float32)
        self.steps = np.zeros(len(self.lengths), np.int64) if steps is None else np.asarray(steps, np.int64)
        self.cache = cache
        self.side = side

    def __len__(self) -> int:
        return len(self.lengths)

    def next_mask(self) -> np.ndarray:
        """The attention mask of the next decode step: one more real column per row."""
        if self.cache.contiguous:
            return (np.arange(int(self.lengths.max()) + 1)[None, :] <= self.lengths[:, None]).astype(np.int64)
        return np.concatenate([self.mask, np.ones((len(self), 1), np.int64)], axis=1)

    def keep(self, rows: Sequence[int]) -> "DecodeBatch":
        """The batch of ``rows`` (in that order). Left-padded, the leading columns no kept row attends to are
        dropped, so the past never grows beyond the longest live row."""
        idx = np.asarray(rows, dtype=np.int64)
        mask, lengths = self.mask[idx], self.lengths[idx]
        drop = 0
        if self.cache.contiguous:
            mask = mask[:, :int(lengths.max())] if len(idx) else mask
        elif self.side == LEFT and len(idx):
            # every row's mask is zeros then ones: the first attended column is the fewest leading zeros
            drop = int(np.min(np.argmax(mask, axis=1)))
            mask = mask[:, drop:]
        return DecodeBatch(mask, lengths, self.decision[idx], self.cache.keep(idx, drop), self.side, self.steps[idx])

    @classmethod
    def join(cls, parts: list["DecodeBatch"]) -> "DecodeBatch":
        """One batch of every part's rows, in order; a shorter part gains masked columns on the padding side."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        side = parts[0].side
        width = max(p.mask.shape[1] for p in parts)
        mask = np.concatenate([_pad_columns(p.mask, width, side) for p in parts], axis=0)
        return cls(mask, np.concatenate([p.lengths for p in parts]), np.concatenate([p.decision for p in parts]),
                   type(parts[0].cache).join([p.cache for p in parts], side), side,
                   np.concatenate([p.steps for p in parts]))


@dataclass
class Prefill:
    """What a prefill gives: each row's logits at its last prompt position ``[B, V]``, its decision and score
    (``score`` None for an unsteered graph), the rows as a :class:`DecodeBatch`, and the passes run (1 or 2)."""

    logits: np.ndarray
    gate: np.ndarray
    score: np.ndarray | None
    rows: DecodeBatch
    passes: int = 1


class StepModel:
    """A loaded graph as the generation loop sees it: the backend's forward step, the pad token, the two-pass rule,
    the context length, the embedding graph of a vision-language export, the strength schedule and the end rule.
    :meth:`aligner_runtime.Aligner.step_model` gives the one of a loaded export."""

    def __init__(self, backend: Backend, *, pad_token_id: int, two_pass: bool, context_length: int | None = None,
                 embedder=None, strength: StrengthSchedule | Callable[[int], float] = CONSTANT_STRENGTH,
                 end_rule: EndRule = NO_END_RULE, end_token_ids: Sequence[int] = ()):
        check_token_ids([pad_token_id], backend.vocab_size, "pad token")
        self.backend = backend
        self.pad_token_id = int(pad_token_id)
        self.two_pass = bool(two_pass)
        self.context_length = context_length
        # ``strength``: the export's schedule, or any function of the decode step (a test's, a sweep's)
        self.strength = strength
        constant = isinstance(strength, StrengthSchedule) and strength.half_life is None
        self._strength_at = None if constant else strength.at if isinstance(strength, StrengthSchedule) else strength
        # The end rule (docs/contract.md "Ending a steered answer") raises these tokens' logits on steered rows.
        self.end_rule = end_rule
        self.end_token_ids = tuple(int(t) for t in end_token_ids)
        check_token_ids(self.end_token_ids, backend.vocab_size, "end token")
        self.vocab_size = backend.vocab_size
        self.steered = GATE_IN in backend.input_names
        self.past_inputs = [n for n in backend.input_names if is_past(n)]
        self.takes_positions = POSITION_IDS in backend.input_names
        # Graphs whose attention keeps each row's keys from position 0 (GroupQueryAttention) are padded on the right.
        self.padding_side = getattr(backend, "padding_side", LEFT)
        self._kv_factory = getattr(backend, "kv_cache", None)
        self.takes_embeds = INPUTS_EMBEDS in backend.input_names
        if self.takes_embeds and embedder is None:
            raise AlignerError("this graph takes inputs_embeds: it needs the export's embedding graph")
        self.embedder = embedder

    def with_strength(self, strength: StrengthSchedule) -> "StepModel":
        return StepModel(self.backend, pad_token_id=self.pad_token_id, two_pass=self.two_pass,
                         context_length=self.context_length, embedder=self.embedder, strength=strength,
                         end_rule=self.end_rule, end_token_ids=self.end_token_ids)

    # --- requests ---------------------------------------------------------------------------------------------------
    def check_prompt(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a list of ints, or one :class:`AlignerError` (empty, out of the vocabulary, no room left)."""
        ids = list(ids)
        if not ids:
            raise AlignerError("empty prompt")
        check_token_ids(ids, self.vocab_size, "prompt token")
        if self.context_length is not None and len(ids) >= self.context_length:
            raise AlignerError(f"prompt is {len(ids)} tokens long; the model's context is {self.context_length} "
                               f"tokens and needs room for at least one new token")
        return [int(t) for t in ids]

    def check_embeds(self, ids: Sequence[int], embeds: np.ndarray | None) -> None:
        """A prompt's own embeddings (images merged) must be one row per token, for a graph that takes them."""
        if embeds is None:
            return
        if not self.takes_embeds:
            raise AlignerError("this export's language model takes token ids only; it cannot take image features")
        if embeds.ndim != 2 or embeds.shape[0] != len(ids):
            raise AlignerError(f"{embeds.shape[0] if embeds.ndim else 0} embeddings for {len(ids)} prompt tokens")

    def budget(self, config: SamplingConfig, prompt_tokens: int) -> int:
        """New tokens a prompt may get: ``max_new_tokens``, cut where the answer would run past the context."""
        if self.context_length is None:
            return config.max_new_tokens
        return min(config.max_new_tokens, self.context_length - prompt_tokens)

    # --- the graph --------------------------------------------------------------------------------------------------
    def empty_cache(self, batch: int, capacity: int | None):
        """A new, empty KV cache for ``batch`` rows; ``capacity``: the positions a shared buffer must hold."""
        if self._kv_factory is not None:
            return self._kv_factory(batch, capacity)
        return NumpyKV.empty(self.backend, self.past_inputs, batch)

    def forward(self, input_ids, attention_mask, positions, cache, gate_in, embeds=None) -> dict[str, np.ndarray]:
        """One forward step; ``cache`` (the rows' KV cache) is updated in place to hold this step's keys. Returns
        the graph's other outputs."""
        feeds = {ATTENTION_MASK: attention_mask}
        if self.takes_embeds:
            feeds[INPUTS_EMBEDS] = embeds if embeds is not None else self.embedder(input_ids)
        else:
            feeds[INPUT_IDS] = input_ids
        if self.takes_positions:
            feeds[POSITION_IDS] = positions
        cache.feed(feeds)
        if self.steered:
            feeds[GATE_IN] = np.asarray(gate_in, np.float32)
        outputs = self.backend._run(feeds)
        cache.take(outputs)
        return outputs

    def pad(self, prompts: Sequence[Sequence[int]], prompt_embeds: Sequence[np.ndarray | None] | None = None
            ) -> PromptBatch:
        """The padded prompt batch, on the left (every row's last token in the last column) unless the graph wants
        the right. A graph that takes embeddings gets the embedding graph's, with each prompt's own (images merged)
        in its real positions."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        right = self.padding_side == RIGHT
        for b, ids in enumerate(prompts):
            cols = slice(0, len(ids)) if right else slice(width - len(ids), width)
            input_ids[b, cols] = ids
            mask[b, cols] = 1
        embeds = None
        if self.takes_embeds:
            embeds = np.array(self.embedder(input_ids), copy=True)
            for b, own in enumerate(prompt_embeds or ()):
                if own is not None:
                    self.check_embeds(prompts[b], own)
                    start = 0 if right else width - own.shape[0]
                    embeds[b, start:start + own.shape[0]] = own
        elif prompt_embeds is not None and any(e is not None for e in prompt_embeds):
            raise AlignerError("this export's language model takes token ids only; it cannot take image features")
        return PromptBatch(input_ids, mask, position_ids(mask), embeds,
                           np.asarray([len(p) for p in prompts], np.int64))

    def forward_prompts(self, prompts: PromptBatch, gate_in: np.ndarray, capacity: int | None):
        """One pass over a prompt batch, in groups of rows so that the graph's logits for every prompt position
        (``[rows, S, V]`` float32) stay under PREFILL_LOGITS_BYTES; rows are independent, so the groups' outputs are
        concatenated. Returns ``(outputs, cache)``: ``outputs[LOGITS]`` is each row's last real position's ``[B, V]``,
        beside the steering outputs."""
        batch, width = prompts.input_ids.shape
        vocab = self.vocab_size or 1
        rows = max(1, min(batch, PREFILL_LOGITS_BYTES // max(1, width * vocab * 4)))
        last = prompts.last_positions
        parts, caches = [], []
        for first in range(0, batch, rows):
            sl = slice(first, first + rows)
            cache = self.empty_cache(len(gate_in[sl]), capacity)
            out = self.forward(prompts.input_ids[sl], prompts.attention_mask[sl], prompts.positions[sl], cache,
                               gate_in[sl], None if prompts.embeds is None else prompts.embeds[sl])
            logits = out[LOGITS]
            # drop the [rows, S, V] array now; keep each row's last real position
            out = {k: v for k, v in out.items() if k in (GATE_OUT, SCORE_OUT)}
            out[LOGITS] = logits[np.arange(logits.shape[0]), last[sl] - (width - logits.shape[1])].copy()
            parts.append(out)
            caches.append(cache)
        cache = type(caches[0]).join(caches, self.padding_side)
        if len(parts) == 1:
            return parts[0], cache
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}, cache

    # --- the step primitives ------------------------------------------------------------------------------------------
    def prefill(self, prompts: PromptBatch, *, capacity: int | None, gate_override: float | None = None,
                second_pass: bool = True) -> Prefill:
        """§5 rules 1 and 2: the scoring prefill (``steer_gate_in = -1``), the decision (``contract.prefill_decision``:
        fail closed, a row whose score is not finite is steered even where an older graph's SteerGate let it through;
        docs/contract.md, issue 14), then the rows to prefill again with the gate imposed, so that layers below the
        gate layer are shifted too; the scoring pass stays the reported score. ``gate_override`` imposes a gate on
        every row instead (the evaluation switch; one pass). ``second_pass=False``: the decision only."""
        batch = len(prompts.lengths)
        first_gate = np.full(batch, GATE_DECIDE if gate_override is None else gate_override, np.float32)
        outputs, cache = self.forward_prompts(prompts, first_gate, capacity)
        logits, passes = outputs[LOGITS], 1
        if not self.steered:
            gate, score, again = np.zeros(batch, np.float32), None, np.zeros(0, np.int64)
        else:
            score = np.asarray(outputs[SCORE_OUT], dtype=np.float32).reshape(batch).copy()
            if gate_override is not None:
                gate, again = np.asarray(outputs[GATE_OUT], dtype=np.float32).reshape(batch).copy(), []
            else:
                gate, again = prefill_decision(outputs[GATE_OUT], score, self.two_pass)
        if second_pass and len(again):
            steered, steered_cache = self.forward_prompts(prompts.rows(again), np.ones(len(again), np.float32),
                                                          capacity)
            passes = 2
            logits = logits.copy()
            logits[again] = steered[LOGITS]
            cache.replace_rows(again, steered_cache)
        rows = DecodeBatch(prompts.attention_mask, prompts.lengths, gate, cache, self.padding_side)
        return Prefill(logits, gate, score, rows, passes)

    def decode(self, rows: DecodeBatch, tokens: np.ndarray) -> np.ndarray:
        """One decode step over ``rows``: ``tokens`` ``[B]`` are the rows' last picked tokens. Each row is fed its
        decision scaled by the strength schedule at its own step (§5 rule 3, docs/contract.md: harmless rows stay
        0, steered rows get strength(step), 1 when constant) and its own position. Updates ``rows`` in place and
        returns the new logits ``[B, V]`` (a view of the graph's output)."""
        rows.steps += 1
        gate_in = rows.decision
        if self._strength_at is not None:
            gate_in = gate_in * np.asarray([self._strength_at(int(s)) for s in rows.steps], np.float32)
        mask = rows.next_mask()
        outputs = self.forward(np.asarray(tokens, np.int64).reshape(-1, 1), mask, rows.lengths[:, None],
                               rows.cache, gate_in)
        rows.mask = mask
        rows.lengths = rows.lengths + 1
        return outputs[LOGITS][:, -1, :]

    def pick(self, logits: np.ndarray, generated: int, decision: float, config: SamplingConfig,
             rng: np.random.Generator | None) -> int:
        """One row's next token: the end rule for its token number ``generated``, then greedy or seeded sampling."""
        if self.end_rule.active:
            logits = self.end_rule.apply(logits, generated, float(decision), self.end_token_ids)
        return pick_token(logits, config, rng)


class GenerationRun:
    """One call's generation over a batch. Iterate it to get ``[(row, token_id), ...]`` per step; afterwards
    ``results`` holds one :class:`RowResult` per prompt, in order.

    ``_gate_override`` imposes a gate on every row (0.0 = unsteered); private: only the evaluation module
    (``aligner_runtime.evaluation``, the explicitly named switch) passes it.

    ``compact``: finished rows leave the batch (faster). Without it every step keeps the batch's shapes, so a row's
    arithmetic does not depend on when its batch-mates stop: ONNX Runtime's kernels pick their blocking by shape,
    which moves the last bits of the logits. The evaluation's steered-versus-unsteered identity check needs that.
    """

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], config: SamplingConfig, *,
                 pad_token_id: int, two_pass: bool, context_length: int | None = None,
                 _gate_override: float | None = None, compact: bool = True, embedder=None,
                 prompt_embeds: Sequence[np.ndarray | None] | None = None,
                 strength: StrengthSchedule = CONSTANT_STRENGTH, end_rule: EndRule = NO_END_RULE,
                 end_token_ids: Sequence[int] = ()):
        model = StepModel(backend, pad_token_id=pad_token_id, two_pass=two_pass, context_length=context_length,
                          embedder=embedder, strength=strength, end_rule=end_rule, end_token_ids=end_token_ids)
        self._setup(model, prompts, config, _gate_override, compact, prompt_embeds)

    @classmethod
    def of(cls, model: StepModel, prompts: Sequence[Sequence[int]], config: SamplingConfig, *,
           _gate_override: float | None = None, compact: bool = True,
           prompt_embeds: Sequence[np.ndarray | None] | None = None) -> "GenerationRun":
        """A run over an already built :class:`StepModel` (``Aligner`` makes its runs so)."""
        run = cls.__new__(cls)
        run._setup(model, prompts, config, _gate_override, compact, prompt_embeds)
        return run

    def _setup(self, model: StepModel, prompts, config, gate_override, compact, prompt_embeds) -> None:
        if not prompts:
            raise AlignerError("no prompts given")
        self.model = model
        self.prompts = [model.check_prompt(ids) for ids in prompts]
        self.config = config
        self._gate_override = gate_override
        if gate_override is not None and not model.steered:
            raise AlignerError("this graph has no steering interface to override")
        self.compact = compact
        self.steered_graph = model.steered
        self.timing = RunTiming()
        self.results: list[RowResult] | None = None
        self.prompt_embeds = list(prompt_embeds) if prompt_embeds is not None else [None] * len(self.prompts)
        if len(self.prompt_embeds) != len(self.prompts):
            raise AlignerError("prompt_embeds must hold one entry per prompt")
        for ids, embeds in zip(self.prompts, self.prompt_embeds):
            model.check_embeds(ids, embeds)

    def score(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The scoring prefill alone (``steer_gate_in = -1``): the gate and score of every prompt, no generation."""
        prompts = self.model.pad(self.prompts, self.prompt_embeds)
        start = time.perf_counter()
        done = self.model.prefill(prompts, capacity=prompts.input_ids.shape[1], gate_override=self._gate_override,
                                  second_pass=False)
        self.timing.prefill_seconds, self.timing.prefill_passes = time.perf_counter() - start, 1
        return done.gate, done.score

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        model, config = self.model, self.config
        batch = len(self.prompts)
        prompts = model.pad(self.prompts, self.prompt_embeds)
        lengths = [len(p) for p in self.prompts]
        budgets = [model.budget(config, n) for n in lengths]
        # A shared past/present buffer holds the padded prompt and the longest answer this run may produce.
        capacity = prompts.input_ids.shape[1] + max(budgets)
        start = time.perf_counter()
        prefilled = model.prefill(prompts, capacity=capacity, gate_override=self._gate_override)
        self.timing.prefill_seconds = time.perf_counter() - start
        self.timing.prefill_passes = prefilled.passes
        logits, gate, active = prefilled.logits, prefilled.gate, prefilled.rows

        rngs = [np.random.default_rng(config.seed) for _ in range(batch)] if not config.greedy else [None] * batch
        stop = set(config.stop_token_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        order = list(range(batch))  # the prompt of each row of ``active``
        self.results = None
        decode_start = time.perf_counter()
        done = [False] * batch
        while True:
            step_tokens, keep = [], []
            for i, row in enumerate(order):
                if done[row]:  # only without compaction: a finished row rides along, its outputs ignored
                    continue
                token = model.pick(logits[i], len(generated[row]), active.decision[i], config, rngs[row])
                generated[row].append(token)
                step_tokens.append((row, token))
                if token in stop:
                    finish[row] = "stop"
                    done[row] = True
                elif len(generated[row]) < budgets[row]:
                    keep.append(i)
                else:
                    done[row] = True
            yield step_tokens
            if not keep:
                break
            if self.compact and len(keep) < len(order):
                active = active.keep(keep)
                order = [order[i] for i in keep]
            self.timing.decode_steps += 1
            logits = model.decode(active, np.asarray([generated[row][-1] for row in order], np.int64))
        self.timing.decode_seconds = time.perf_counter() - decode_start
        score = prefilled.score
        self.results = [
            RowResult(token_ids=generated[b], prompt_tokens=lengths[b],
                      gate=float(gate[b]) if self.steered_graph else None,
                      score=float(score[b]) if score is not None else None, finish_reason=finish[b])
            for b in range(batch)]

    def run(self) -> list[RowResult]:
        for _ in self:
            pass
        return self.results
