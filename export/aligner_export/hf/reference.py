"""The PyTorch reference: InferAligner steering of an HF model with forward hooks (docs/architecture.md §5, §5.1).

It is the oracle for the exporter's and the runtime's tests and the baseline for the benchmarks, so it is written
directly from the contract (docs/contract.md), independently of the ONNX rewrite:

- a forward pre-hook on the model captures the ``attention_mask`` of each call;
- a forward hook on each gate layer ``l ∈ G`` adds that layer's term to the row's score from the layer output
  *before* any shift at ``l``, by the term registered for the gate's kind (``GATE_TERMS``): version 1,
  ``h_l[b, last_b] · direction``; version 2, the mean over the last ``K`` valid positions of this call of
  ``n(h_l[b, s]) · w_l``; version 3, that plus the max over every valid position of ``n(h_l[b, s]) · m_l``. At
  ``g* = max G`` the bias is added and the gate decided:
  ``gate_in`` if ``gate_in >= 0``, else 1 when the score is > 0 or not finite; on a call with a past a row whose
  ``gate_in >= 0`` reports the score 0 (docs/contract.md "The score at decode");
- a forward hook on each steered layer ``l`` adds ``gate · vector_l`` at every position, with the decided gate for
  ``l >= g*`` and ``max(gate_in, 0)`` for ``l < g*``; in shift mode "norm" (SteerShift version 2) the sum is then
  rescaled to the position's norm before the shift, and a gate-0 row is returned as it came.

``reference_generate`` latches the gate at prefill: a clean scoring pass decides it, then ``generate()`` runs with
``gate_in`` fixed to it, which is what the runtime protocol's feedback of ``steer_gate`` amounts to.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from aligner_runtime.contract import (ATTENTION_MASK, GATE_KINDS, GateConfig, SteerConfig, shift_mode_named,
                                      shift_takes_decision)

from aligner_export.hf.families import family_for

NORM_EPS = 1e-6  # docs/contract.md: n(x) = x / max(||x||, 1e-6)


@dataclass
class SteerState:
    gate_in: torch.Tensor | None = None  # [B]; None means -1 for every row
    gate: torch.Tensor | None = None
    score: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = field(default=None, repr=False)
    enabled: bool = True


def last_positions(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Position within this call's ``seq`` positions of each row's last token whose mask is 1 (§5)."""
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long)
    total = attention_mask.shape[1]
    idx = torch.arange(total, device=attention_mask.device)
    has_one = attention_mask.bool().any(dim=1)
    last_t = torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values
    pos = last_t - (total - seq)
    pos = torch.where(has_one, pos, torch.full_like(pos, seq - 1))
    return pos.clamp(0, seq - 1)


def pooled_positions(attention_mask: torch.Tensor | None, batch: int, seq: int, tokens: int) -> torch.Tensor:
    """Version 2's pooled positions as a [B, S] bool mask: the last ``tokens`` positions of this call whose mask is
    1; a row with none pools version 1's ``last_b`` alone (docs/contract.md)."""
    if attention_mask is None:
        valid = torch.ones(batch, seq, dtype=torch.bool)
    else:
        valid = attention_mask[:, -seq:].bool()
    rank_from_end = valid.flip(1).long().cumsum(1).flip(1)  # valid positions at or after s
    pooled = valid & (rank_from_end <= tokens)
    none = ~pooled.any(dim=1)
    if none.any():
        fallback = torch.zeros(batch, seq, dtype=torch.bool)
        fallback[torch.arange(batch), last_positions(attention_mask, batch, seq)] = True
        pooled = torch.where(none[:, None], fallback, pooled)
    return pooled


# --- the registries: each gate kind's term and each shift mode, written from docs/contract.md -----------------------
# (hidden [B, S, H], attention_mask, gate, weight [H], layer) -> one gate layer's contribution to the score, float32
# [B] (``layer`` picks a kind's other per-layer constants, version 3's max weight).
GateTerm = Callable[[torch.Tensor, "torch.Tensor | None", GateConfig, torch.Tensor, int], torch.Tensor]
# (hidden, row_gate [B], vector [H]) -> the shifted hidden, in hidden's dtype.
Shift = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GATE_TERMS: dict[str, GateTerm] = {}  # by contract.GateKind.name
SHIFTS: dict[str, Shift] = {}  # by contract.ShiftMode.name


def register_gate_term(kind_name: str) -> Callable[[GateTerm], GateTerm]:
    """Registers the reference term of the contract's gate kind ``kind_name`` (registered there first)."""
    if kind_name not in {k.name for k in GATE_KINDS.values()}:
        raise ValueError(f"gate kind {kind_name!r} is not registered in aligner_runtime.contract.steering")

    def register(term: GateTerm) -> GateTerm:
        if kind_name in GATE_TERMS:
            raise ValueError(f"the reference term of gate kind {kind_name!r} is registered already")
        GATE_TERMS[kind_name] = term
        return term
    return register


def register_shift(mode_name: str) -> Callable[[Shift], Shift]:
    """Registers the reference SteerShift of the contract's shift mode ``mode_name`` (registered there first)."""
    shift_mode_named(mode_name)

    def register(shift: Shift) -> Shift:
        if mode_name in SHIFTS:
            raise ValueError(f"the reference shift of mode {mode_name!r} is registered already")
        SHIFTS[mode_name] = shift
        return shift
    return register


@register_gate_term("paper")
def _last_token_term(hidden: torch.Tensor, attention_mask, gate: GateConfig, weight: torch.Tensor,
                     layer: int) -> torch.Tensor:
    """SteerGate version 1: ``h[b, last_b] · direction``."""
    batch, seq, _ = hidden.shape
    return hidden[torch.arange(batch), last_positions(attention_mask, batch, seq)].float() @ weight


@register_gate_term("linear")
def _pooled_term(hidden: torch.Tensor, attention_mask, gate: GateConfig, weight: torch.Tensor,
                 layer: int) -> torch.Tensor:
    """SteerGate version 2: the mean over the pooled positions of ``n(h[b, s]) · w_l``."""
    batch, seq, _ = hidden.shape
    values = hidden.float()
    dots = values @ weight  # [B, S]
    if gate.normalize:
        dots = dots / values.norm(dim=-1).clamp(min=NORM_EPS)
    pooled = pooled_positions(attention_mask, batch, seq, gate.tokens)
    total = torch.where(pooled, dots, torch.zeros_like(dots)).sum(dim=1)
    return total / pooled.sum(dim=1).float()


@register_gate_term("pooled")
def _pooled_max_term(hidden: torch.Tensor, attention_mask, gate: GateConfig, weight: torch.Tensor,
                     layer: int) -> torch.Tensor:
    """SteerGate version 3 (issue 18): version 2's term plus the max over every valid position of this call (version
    1's ``last_b`` on a row with none) of ``n(h[b, s]) · m_l``, NaN when any of those is NaN."""
    batch, seq, _ = hidden.shape
    values = hidden.float()
    max_weight = torch.as_tensor(np.asarray(gate.max_weights[layer], dtype=np.float32))
    terms = values @ max_weight  # [B, S]
    if gate.normalize:
        terms = terms / values.norm(dim=-1).clamp(min=NORM_EPS)
    if attention_mask is None:
        positions = torch.ones(batch, seq, dtype=torch.bool)
    else:
        positions = attention_mask[:, -seq:].bool()
    none = ~positions.any(dim=1)
    if none.any():
        fallback = torch.zeros(batch, seq, dtype=torch.bool)
        fallback[torch.arange(batch), last_positions(attention_mask, batch, seq)] = True
        positions = torch.where(none[:, None], fallback, positions)
    top = torch.where(positions, terms, torch.full_like(terms, -torch.inf)).max(dim=1).values
    nan = (positions & torch.isnan(terms)).any(dim=1)
    top = torch.where(nan, torch.full_like(top, torch.nan), top)
    # ((score_in + f) + m): the pooled term first, as the operator adds them.
    return _pooled_term(hidden, attention_mask, gate, weight, layer), top


def gate_term(hidden: torch.Tensor, attention_mask, gate: GateConfig, weight: torch.Tensor, layer: int):
    """One gate layer's contribution to the score, float32 [B], by the term of the gate's kind; a tuple of the
    terms in the order the operator adds them when it has several (version 3: the pooled term, then the max)."""
    try:
        term = GATE_TERMS[gate.kind.name]
    except KeyError:
        raise ValueError(f"no PyTorch reference for the {gate.kind.name} gate (version {gate.version})") from None
    return term(hidden, attention_mask, gate, weight, layer)


def score_skipped(gate_in: torch.Tensor, attention_mask, seq: int) -> torch.Tensor:
    """The rows whose score is not computed (docs/contract.md "The score at decode", issue 20): on a call with a past
    (``T > S``, T the mask's width) a row whose ``gate_in >= 0`` gets ``gate = gate_in`` and ``score = 0``."""
    has_past = attention_mask is not None and attention_mask.shape[1] > seq
    return (gate_in >= 0) & has_past


def decide(gate_in: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    fires = (score > 0) | ~torch.isfinite(score)
    return torch.where(gate_in >= 0, gate_in, fires.float())


@register_shift("add")
def _add_shift(hidden: torch.Tensor, row_gate: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """SteerShift version 1: ``h + gate·v`` in float32, cast back."""
    return (hidden.float() + row_gate.view(hidden.shape[0], 1, 1) * vector).to(hidden.dtype)


@register_shift("norm")
def _norm_shift(hidden: torch.Tensor, row_gate: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """SteerShift version 2: ``y · (‖h‖ / max(‖y‖, 1e-6))`` with ``y = h + gate·v``; a gate-0 row as it came."""
    batch = hidden.shape[0]
    h = hidden.float()
    shifted = h + row_gate.view(batch, 1, 1) * vector
    before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    after = torch.linalg.vector_norm(shifted, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    out = (shifted * (before / after)).to(hidden.dtype)
    # Gate-0 rows are the input itself, whatever the rounding of the rescaling.
    return torch.where((row_gate == 0).view(batch, 1, 1), hidden, out)


def shift_hidden(hidden: torch.Tensor, row_gate: torch.Tensor, vector: torch.Tensor, mode: str) -> torch.Tensor:
    """SteerShift of ``mode`` on one layer's output (docs/contract.md), by the registered reference of that mode."""
    if mode not in SHIFTS:
        raise ValueError(f"unknown shift mode {mode!r}")
    return SHIFTS[mode](hidden, row_gate, vector)


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def steered(model, config: SteerConfig) -> Iterator[SteerState]:
    """Registers the steering hooks on ``model`` for the duration of the block."""
    layers = family_for(model.config).decoder_layers(model)
    num_layers = len(layers)
    state = SteerState()
    gate = config.gate
    weights = {l: torch.as_tensor(np.asarray(w, dtype=np.float32)) for l, w in gate.weights.items()}
    vectors = {int(l): torch.as_tensor(np.asarray(v, dtype=np.float32)) for l, v in config.vectors.items()}
    gate_layers, last_gate = set(gate.layers), gate.last_layer
    shift_mode = config.shift_mode
    shift_mode_named(shift_mode)  # an unknown mode is refused before any hook is placed
    if any(not 0 <= l < num_layers for l in gate_layers | set(vectors)):
        raise ValueError(f"layers out of range for a model with {num_layers} layers")
    partial: dict[str, torch.Tensor] = {}

    def gate_in_for(batch: int) -> torch.Tensor:
        if state.gate_in is None:
            return torch.full((batch,), -1.0)
        return torch.as_tensor(state.gate_in, dtype=torch.float32).reshape(batch)

    def pre_hook(_module, args, kwargs):
        state.attention_mask = kwargs.get(ATTENTION_MASK)
        if state.attention_mask is None and len(args) > 1:
            state.attention_mask = args[1]
        state.gate = state.score = None
        partial.clear()

    def make_layer_hook(layer: int):
        def hook(_module, _args, output):
            if not state.enabled:
                return output
            hidden = _hidden_of(output)
            batch, seq, _ = hidden.shape
            gate_in = gate_in_for(batch)
            if layer in gate_layers:  # the score reads the output before any shift at this layer
                terms = gate_term(hidden, state.attention_mask, gate, weights[layer], layer)
                score = partial.get("score", torch.zeros(batch))
                for term in terms if isinstance(terms, tuple) else (terms,):
                    score = score + term
                partial["score"] = score
                if layer == last_gate:
                    skipped = score_skipped(gate_in, state.attention_mask, seq)
                    state.score = torch.where(skipped, torch.zeros(batch), score + np.float32(gate.bias))
                    state.gate = decide(gate_in, state.score)
            if layer not in vectors:
                return output
            row_gate = state.gate if shift_takes_decision(layer, gate.layers) else gate_in.clamp(min=0.0)
            return _replace_hidden(output, shift_hidden(hidden, row_gate, vectors[layer], shift_mode))
        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for layer in sorted(set(vectors) | gate_layers):
        handles.append(layers[layer].register_forward_hook(make_layer_hook(layer)))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def score_prompts(model, config: SteerConfig, input_ids, attention_mask, **model_kwargs) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """A clean scoring pass: returns ``(gate, score)`` with ``gate_in = -1``. ``model_kwargs``: e.g. the
    ``pixel_values`` of a vision-language model."""
    with steered(model, config) as state:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        return state.gate.clone(), state.score.clone()


class EndRuleProcessor:
    """docs/contract.md "Ending a steered answer", as a transformers logits processor: before new token ``n`` of a
    row whose gate is > 0, ``slope · (n − after)`` (for ``n > after``) is added to the end-of-sequence logits."""

    def __init__(self, after: int, slope: float, eos_token_ids, gate: torch.Tensor, prompt_length: int):
        self.after, self.slope = int(after), float(slope)
        self.eos = list(eos_token_ids)
        self.steered = gate.reshape(-1) > 0
        self.prompt_length = int(prompt_length)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_length
        if n <= self.after or not self.steered.any():
            return scores
        bonus = torch.tensor(np.float32(self.slope) * np.float32(n - self.after))
        scores = scores.clone()
        for eos in self.eos:
            scores[self.steered, eos] = scores[self.steered, eos] + bonus
        return scores


@torch.no_grad()
def reference_generate(model, config: SteerConfig, input_ids, attention_mask, max_new_tokens: int = 8,
                       end_rule: dict | None = None, eos_token_ids=(), **generate_kwargs):
    """Greedy generation with the gate latched at prefill. Returns ``(sequences, gate, score)``.
    ``pixel_values`` (and ``image_sizes``) in ``generate_kwargs`` reach the scoring pass too. ``end_rule``: the
    manifest's ``{after, slope}``, applied to steered rows with ``eos_token_ids``."""
    extra = {k: generate_kwargs[k] for k in ("pixel_values", "image_sizes") if k in generate_kwargs}
    gate, score = score_prompts(model, config, input_ids, attention_mask, **extra)
    if end_rule:
        # deferred: transformers, needed only for an end rule (the hooks themselves are plain torch)
        from transformers import LogitsProcessorList

        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [EndRuleProcessor(end_rule["after"], end_rule["slope"], eos_token_ids, gate, input_ids.shape[1])])
    with steered(model, config) as state:
        state.gate_in = gate
        generate_kwargs.setdefault("do_sample", False)
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, **generate_kwargs)
    return sequences, gate, score
