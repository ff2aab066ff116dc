"""The one generation loop, shared by every backend (docs/architecture.md §5, runtime protocol).

A backend only runs one forward step: ``backend._run(feeds) -> outputs`` over the graph interface (private: it takes
any ``steer_gate_in``, so only this loop calls it)

    input_ids [B,S] i64, attention_mask [B,T] i64, position_ids [B,S] i64 (if the graph has it),
    past_key_values.{i}.key/.value [B,kvh,P,hd], steer_gate_in [B] f32
    -> logits [B,S,V], present.{i}.key/.value [B,kvh,T,hd], steer_gate [B], steer_score [B]

A vision-language export's language model takes ``inputs_embeds [B,S,H]`` instead of ``input_ids``; the run then
embeds tokens with ``embedder`` (the export's embedding graph) and takes each prompt's embeddings, images merged,
from ``prompt_embeds`` (``aligner_runtime.multimodal``).

Everything else is here: padding, the KV cache, the two-pass prefill, the gate fed back on every step, greedy or
seeded sampling, stop tokens and ``max_new_tokens``.

The KV cache is an object of the run (:class:`NumpyKV` by default: the presents come back as numpy arrays and are fed
as the next step's past). A backend with ``kv_cache(batch, capacity)`` (ONNX Runtime) gives its own: the cache stays
in buffers that the backend binds as past and present (I/O binding), so nothing goes through numpy per step, and
graphs whose attention shares past and present (GroupQueryAttention) write each step's keys into a buffer
preallocated for the whole generation. Such a backend's ``_run`` finds the cache in ``feeds[KV_FEED]`` and updates
it in place. A backend's ``padding_side`` (default ``left``) says how its graph wants a batch padded.

Thread safety: all loop state lives in one :class:`GenerationRun` per call, so concurrent calls share nothing but the
backend; each backend documents whether its ``run`` may be called concurrently (ONNX Runtime's may, the TensorRT
backend serialises its steps with a lock).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from .contract import (ATTENTION_MASK, CONSTANT_STRENGTH, GATE_DECIDE, GATE_IN, GATE_OUT, INPUTS_EMBEDS, INPUT_IDS,
                       LOGITS, NO_END_RULE, PAST, POSITION_IDS, PRESENT_PREFIX, SCORE_OUT, EndRule, StrengthSchedule,
                       position_ids, prefill_decision, present_name)
from .errors import AlignerError

KV_FEED = "__kv_cache__"  # feeds key under which the loop hands a backend its own KV cache object
# Upper bound on the prefill's logits array; a long prompt batch is prefilled in groups of rows below it.
PREFILL_LOGITS_BYTES = 256 * 2 ** 20


class Backend(Protocol):
    """One forward step of an exported graph. See the module docstring for the tensors."""

    input_names: list[str]
    output_names: list[str]
    vocab_size: int | None

    def past_spec(self, name: str) -> tuple[int, int, np.dtype]:
        """``(kv_heads, head_dim, dtype)`` of the past input ``name``."""

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


# The most new tokens one call may ask for (docs/contract.md "Limits"); the context bounds it further
# (``Aligner._config``: a prompt's answer never runs past the export's context length).
MAX_NEW_TOKENS = 32768


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. ``temperature == 0`` or ``do_sample=False`` means greedy."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, vocab_size: int | None) -> "SamplingConfig":
        def bad(what: str):
            raise AlignerError(f"invalid sampling parameter: {what}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r:.40}")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            bad(f"max_new_tokens must be at most {MAX_NEW_TOKENS}, got {self.max_new_tokens!r:.40}")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            bad(f"seed must be an integer >= 0, got {self.seed!r}")
        check_token_ids(self.stop_token_ids, vocab_size, "stop token")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def check_token_ids(ids: Sequence[int], vocab_size: int | None, what: str = "token") -> None:
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise AlignerError(f"{what} id {token!r} is not an integer")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise AlignerError(f"{what} id {token} is out of range (vocabulary size {vocab_size})")


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


def filter_logits(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Temperature, top-k and top-p (nucleus) on one row of float logits; removed tokens become -inf."""
    logits = logits.astype(np.float64) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if config.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        sorted_logits = logits[order]
        probs = np.exp(sorted_logits - sorted_logits[0])
        probs /= probs.sum()
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = np.cumsum(probs) - probs < config.top_p
        removed = order[~keep]
        logits[removed] = -np.inf
    return logits


def pick_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator | None) -> int:
    if config.greedy:
        return int(np.argmax(logits))
    filtered = filter_logits(logits, config)
    probs = np.exp(filtered - filtered.max())
    probs /= probs.sum()
    return int(rng.choice(probs.shape[-1], p=probs))


class NumpyKV:
    """The KV cache as numpy arrays ``[B, kv_heads, T, head_dim]``: fed as ``past_key_values.*``, replaced by the
    ``present.*`` outputs after each step. For backends without a cache of their own (TensorRT, test doubles)."""

    bound = False

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

    def keep(self, rows) -> "NumpyKV":
        idx = np.asarray(rows, dtype=np.int64)
        return NumpyKV({k: v[idx] for k, v in self.past.items()})

    def replace_rows(self, rows, other: "NumpyKV") -> None:
        for name, value in other.past.items():
            self.past[name] = self.past[name].copy()
            self.past[name][rows] = value

    @classmethod
    def concat(cls, parts: list["NumpyKV"]) -> "NumpyKV":
        if len(parts) == 1:
            return parts[0]
        return cls({k: np.concatenate([p.past[k] for p in parts], axis=0) for k in parts[0].past})


@dataclass
class _Active:
    """Rows still generating, in batch order; every array is indexed by these rows."""

    rows: list[int]
    attention_mask: np.ndarray
    next_position: np.ndarray
    gate: np.ndarray
    past: object = None  # the run's KV cache (NumpyKV or the backend's own)

    def keep(self, keep: list[int]) -> "_Active":
        idx = np.asarray(keep, dtype=np.int64)
        return _Active([self.rows[i] for i in keep], self.attention_mask[idx], self.next_position[idx],
                       self.gate[idx], self.past.keep(keep))


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
        if not prompts:
            raise AlignerError("no prompts given")
        for ids in prompts:
            if len(ids) == 0:
                raise AlignerError("empty prompt")
            check_token_ids(ids, backend.vocab_size, "prompt token")
            if context_length is not None and len(ids) >= context_length:
                raise AlignerError(f"prompt is {len(ids)} tokens long; the model's context is {context_length} "
                                   f"tokens and needs room for at least one new token")
        check_token_ids([pad_token_id], backend.vocab_size, "pad token")
        self.backend = backend
        self.prompts = [list(map(int, ids)) for ids in prompts]
        self.config = config
        self.pad_token_id = pad_token_id
        self.two_pass = two_pass
        self.context_length = context_length
        self._gate_override = _gate_override
        self.strength = strength
        # The end rule (docs/contract.md "Ending a steered answer") raises these tokens' logits on steered rows.
        self.end_rule = end_rule
        self.end_token_ids = tuple(int(t) for t in end_token_ids)
        check_token_ids(self.end_token_ids, backend.vocab_size, "end token")
        self.compact = compact
        self.steered_graph = GATE_IN in backend.input_names
        if _gate_override is not None and not self.steered_graph:
            raise AlignerError("this graph has no steering interface to override")
        self.timing = RunTiming()
        self.results: list[RowResult] | None = None
        self._past_inputs = [n for n in backend.input_names if PAST.match(n)]
        # Graphs whose attention keeps each row's keys from position 0 (GroupQueryAttention) are padded on the right.
        self.padding_side = getattr(backend, "padding_side", "left")
        self._kv_factory = getattr(backend, "kv_cache", None)
        self._capacity = None  # KV positions a shared buffer must hold: set when the run starts
        self.takes_embeds = INPUTS_EMBEDS in backend.input_names
        if self.takes_embeds and embedder is None:
            raise AlignerError("this graph takes inputs_embeds: it needs the export's embedding graph")
        self.embedder = embedder
        self.prompt_embeds = list(prompt_embeds) if prompt_embeds is not None else [None] * len(self.prompts)
        if len(self.prompt_embeds) != len(self.prompts):
            raise AlignerError("prompt_embeds must hold one entry per prompt")
        if any(e is not None for e in self.prompt_embeds) and not self.takes_embeds:
            raise AlignerError("this export's language model takes token ids only; it cannot take image features")

    # --- graph feeds ----------------------------------------------------------------------------------------------
    def _present_name(self, past_name: str) -> str:
        return present_name(past_name)

    def _step(self, input_ids, attention_mask, positions, past, gate_in, embeds=None) -> dict[str, np.ndarray]:
        """One forward step; ``past`` is the run's KV cache, updated in place to hold this step's keys."""
        feeds = {ATTENTION_MASK: attention_mask}
        if self.takes_embeds:
            feeds[INPUTS_EMBEDS] = embeds if embeds is not None else self.embedder(input_ids)
        else:
            feeds[INPUT_IDS] = input_ids
        if POSITION_IDS in self.backend.input_names:
            feeds[POSITION_IDS] = positions
        past.feed(feeds)
        if self.steered_graph:
            feeds[GATE_IN] = gate_in.astype(np.float32)
        outputs = self.backend._run(feeds)
        past.take(outputs)
        outputs["kv"] = past
        return outputs

    def _empty_past(self, batch: int):
        """A new, empty KV cache for ``batch`` rows."""
        if self._kv_factory is not None:
            return self._kv_factory(batch, self._capacity)
        return NumpyKV.empty(self.backend, self._past_inputs, batch)

    def _presents(self, outputs):
        """The KV cache after a step (:meth:`_step` has already moved the presents into it)."""
        return outputs["kv"]

    def _prompt_embeds(self, input_ids: np.ndarray) -> np.ndarray | None:
        """The padded batch's embeddings: the embedding graph's, with each prompt's own (images merged) in its real
        positions."""
        if not self.takes_embeds:
            return None
        embeds = np.array(self.embedder(input_ids), copy=True)
        for b, own in enumerate(self.prompt_embeds):
            if own is not None:
                if own.shape[0] != len(self.prompts[b]):
                    raise AlignerError(f"prompt {b}: {own.shape[0]} embeddings for {len(self.prompts[b])} tokens")
                start = 0 if self.padding_side == "right" else embeds.shape[1] - own.shape[0]
                embeds[b, start:start + own.shape[0]] = own
        return embeds

    def _last_positions(self, attention_mask: np.ndarray) -> np.ndarray:
        """Each row's last real position in the prompt batch (the last column when padded on the left)."""
        width = attention_mask.shape[1]
        return width - 1 - np.argmax(attention_mask[:, ::-1], axis=1)

    def _prefill(self, input_ids, attention_mask, positions, gate_in, embeds=None) -> dict[str, np.ndarray]:
        """Prefill in groups of rows, so that the graph's logits for every prompt position ([rows, S, V] float32)
        stay under PREFILL_LOGITS_BYTES; rows are independent, so the groups' outputs are concatenated. Returns each
        row's last prompt position's logits [B, V], the other outputs and the KV cache (``outputs["kv"]``)."""
        batch, width = input_ids.shape
        vocab = self.backend.vocab_size or 1
        rows = max(1, min(batch, PREFILL_LOGITS_BYTES // max(1, width * vocab * 4)))
        last = self._last_positions(attention_mask)
        parts, caches = [], []
        for first in range(0, batch, rows):
            sl = slice(first, first + rows)
            cache = self._empty_past(len(gate_in[sl]))
            out = self._step(input_ids[sl], attention_mask[sl], positions[sl], cache, gate_in[sl],
                             None if embeds is None else embeds[sl])
            logits = out[LOGITS]
            # drop the [rows, S, V] array now; keep each row's last real position
            out = {k: v for k, v in out.items() if k != "kv" and not k.startswith(PRESENT_PREFIX)}
            out[LOGITS] = logits[np.arange(logits.shape[0]), last[sl] - (width - logits.shape[1])].copy()
            parts.append(out)
            caches.append(cache)
        cache = type(caches[0]).concat(caches)
        if len(parts) == 1:
            out = parts[0]
        else:
            out = {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}
        out["kv"] = cache
        return out

    # --- the loop -------------------------------------------------------------------------------------------------
    def _batch(self):
        """The padded prompt batch: ``(input_ids, attention_mask, position_ids, embeds)``; padded on the left
        (every row's last token in the last column) unless the backend's graph wants the right."""
        batch = len(self.prompts)
        width = max(len(p) for p in self.prompts)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        right = self.padding_side == "right"
        for b, ids in enumerate(self.prompts):
            cols = slice(0, len(ids)) if right else slice(width - len(ids), width)
            input_ids[b, cols] = ids
            attention_mask[b, cols] = 1
        return input_ids, attention_mask, position_ids(attention_mask), self._prompt_embeds(input_ids)

    def _decided(self, outputs, batch: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The gate and score of a scoring prefill, and the rows to prefill again with the gate imposed
        (``contract.prefill_decision``: fail closed, a row whose score is not finite is steered even where an older
        graph's SteerGate let it through; docs/contract.md, issue 14)."""
        nothing = np.zeros(0, np.int64)
        if not self.steered_graph:
            return np.zeros(batch, np.float32), None, nothing
        score = np.asarray(outputs[SCORE_OUT], dtype=np.float32).reshape(batch).copy()
        if self._gate_override is not None:
            return np.asarray(outputs[GATE_OUT], dtype=np.float32).reshape(batch).copy(), score, nothing
        gate, again = prefill_decision(outputs[GATE_OUT], score, self.two_pass)
        return gate, score, again

    def score(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The scoring prefill alone (``steer_gate_in = -1``): the gate and score of every prompt, no generation."""
        input_ids, attention_mask, positions, embeds = self._batch()
        batch = len(self.prompts)
        self._capacity = input_ids.shape[1]
        start = time.perf_counter()
        outputs = self._prefill(input_ids, attention_mask, positions, np.full(batch, GATE_DECIDE, np.float32),
                                embeds)
        self.timing.prefill_seconds, self.timing.prefill_passes = time.perf_counter() - start, 1
        return self._decided(outputs, batch)[:2]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        config = self.config
        batch = len(self.prompts)
        input_ids, attention_mask, positions, embeds = self._batch()
        # A shared past/present buffer holds the padded prompt and the longest answer this run may produce.
        self._capacity = input_ids.shape[1] + max(
            config.max_new_tokens if self.context_length is None else min(config.max_new_tokens,
                                                                          self.context_length - len(p))
            for p in self.prompts)
        first_gate = np.full(batch, GATE_DECIDE if self._gate_override is None else self._gate_override, np.float32)
        start = time.perf_counter()
        outputs = self._prefill(input_ids, attention_mask, positions, first_gate, embeds)
        self.timing.prefill_passes = 1
        logits = outputs[LOGITS]
        past = self._presents(outputs)
        gate, score, fired = self._decided(outputs, batch)

        # §5 rule 2: rows whose gate fired are prefilled again with the gate imposed, so that layers below the gate
        # layer are shifted too. The scoring pass stays the reported score.
        if fired.size:
            again = self._prefill(input_ids[fired], attention_mask[fired], positions[fired],
                                  np.ones(fired.size, np.float32), None if embeds is None else embeds[fired])
            self.timing.prefill_passes = 2
            logits = logits.copy()
            logits[fired] = again[LOGITS]
            past.replace_rows(fired, self._presents(again))
        self.timing.prefill_seconds = time.perf_counter() - start

        rngs = [np.random.default_rng(config.seed) for _ in range(batch)] if not config.greedy else [None] * batch
        stop = set(config.stop_token_ids)
        lengths = [len(p) for p in self.prompts]
        budgets = [config.max_new_tokens if self.context_length is None
                   else min(config.max_new_tokens, self.context_length - n) for n in lengths]
        generated: list[list[int]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        active = _Active(list(range(batch)), attention_mask, np.asarray(lengths, np.int64), gate, past)
        self.results = None
        decode_start = time.perf_counter()
        done = [False] * batch
        while True:
            step_tokens, keep = [], []
            for i, row in enumerate(active.rows):
                if done[row]:  # only without compaction: a finished row rides along, its outputs ignored
                    continue
                row_logits = logits[i]
                if self.end_rule.active:
                    row_logits = self.end_rule.apply(row_logits, len(generated[row]), float(active.gate[i]),
                                                     self.end_token_ids)
                token = pick_token(row_logits, config, rngs[row])
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
            if self.compact and len(keep) < len(active.rows):
                active = active.keep(keep)
                logits = logits[np.asarray(keep)]
            tokens = np.asarray([[generated[row][-1]] for row in active.rows], dtype=np.int64)
            active.attention_mask = np.concatenate(
                [active.attention_mask, np.ones((len(active.rows), 1), np.int64)], axis=1)
            # The decision latched at prefill is fed back on every decode step (§5 rule 3), scaled by the strength
            # schedule (docs/contract.md): harmless rows stay 0, steered rows get strength(step), 1 when constant.
            self.timing.decode_steps += 1
            outputs = self._step(tokens, active.attention_mask, active.next_position[:, None], active.past,
                                 active.gate * np.float32(self.strength.at(self.timing.decode_steps)))
            active.next_position = active.next_position + 1
            active.past = self._presents(outputs)
            logits = outputs[LOGITS][:, -1, :]
        self.timing.decode_seconds = time.perf_counter() - decode_start
        self.results = [
            RowResult(token_ids=generated[b], prompt_tokens=lengths[b],
                      gate=float(gate[b]) if self.steered_graph else None,
                      score=float(score[b]) if score is not None else None, finish_reason=finish[b])
            for b in range(batch)]

    def run(self) -> list[RowResult]:
        for _ in self:
            pass
        return self.results
