"""The PyTorch reference: InferAligner steering of an HF model with forward hooks (ARCHITECTURE.md §5).

It is the oracle for the exporter's and the runtime's tests and the baseline for the benchmarks, so it is written
directly from the contract, independently of the ONNX rewrite:

- a forward pre-hook on the model captures the ``attention_mask`` of each call;
- a forward hook on decoder layer ``g`` computes ``score = h_g[b, last_b] · direction + bias`` from the layer output
  *before* any shift at ``g``, and the gate ``gate_in`` if ``gate_in >= 0`` else ``score > 0``;
- a forward hook on each steered layer ``l`` adds ``gate · vector_l`` at every position, with the gate of SteerGate
  for ``l >= g`` and ``max(gate_in, 0)`` for ``l < g``.

``reference_generate`` latches the gate at prefill: a clean scoring pass decides it, then ``generate()`` runs with
``gate_in`` fixed to it, which is what the runtime protocol's feedback of ``steer_gate`` amounts to.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .families import family_for


@dataclass
class SteerSpec:
    gate_layer: int
    direction: np.ndarray  # [H], unit: the target's SRV at the gate layer
    bias: float
    steer_layers: Sequence[int]
    vectors: Mapping[int, np.ndarray]  # layer -> alpha_l * theta_l, [H]

    @classmethod
    def from_pack(cls, pack, gate_layer: int, steer_layers: Sequence[int], alpha: float, bias_rule: str) -> "SteerSpec":
        return cls(gate_layer=gate_layer, direction=pack.target_srv[gate_layer], bias=pack.bias(gate_layer, bias_rule),
                   steer_layers=list(steer_layers),
                   vectors={l: np.float32(alpha) * pack.aligned_srv[l] for l in steer_layers})


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


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def steered(model, spec: SteerSpec) -> Iterator[SteerState]:
    """Registers the steering hooks on ``model`` for the duration of the block."""
    layers = family_for(model.config).decoder_layers(model)
    num_layers = len(layers)
    state = SteerState()
    direction = torch.as_tensor(np.asarray(spec.direction, dtype=np.float32))
    vectors = {int(l): torch.as_tensor(np.asarray(v, dtype=np.float32)) for l, v in spec.vectors.items()}
    steer_set = set(int(l) for l in spec.steer_layers)
    gate_layer = int(spec.gate_layer)
    if not 0 <= gate_layer < num_layers or any(not 0 <= l < num_layers for l in steer_set):
        raise ValueError(f"layers out of range for a model with {num_layers} layers")

    def gate_in_for(batch: int) -> torch.Tensor:
        if state.gate_in is None:
            return torch.full((batch,), -1.0)
        return torch.as_tensor(state.gate_in, dtype=torch.float32).reshape(batch)

    def pre_hook(_module, args, kwargs):
        state.attention_mask = kwargs.get("attention_mask")
        if state.attention_mask is None and len(args) > 1:
            state.attention_mask = args[1]
        state.gate = state.score = None

    def make_layer_hook(layer: int):
        def hook(_module, _args, output):
            if not state.enabled:
                return output
            hidden = _hidden_of(output)
            batch, seq, _ = hidden.shape
            gate_in = gate_in_for(batch)
            if layer == gate_layer:
                pos = last_positions(state.attention_mask, batch, seq)
                last = hidden[torch.arange(batch), pos].float()
                state.score = last @ direction + np.float32(spec.bias)
                state.gate = torch.where(gate_in >= 0, gate_in, (state.score > 0).float())
            if layer not in steer_set:
                return output
            gate = state.gate if layer >= gate_layer else gate_in.clamp(min=0.0)
            shifted = (hidden.float() + gate.view(batch, 1, 1) * vectors[layer]).to(hidden.dtype)
            return _replace_hidden(output, shifted)
        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for layer in sorted(steer_set | {gate_layer}):
        handles.append(layers[layer].register_forward_hook(make_layer_hook(layer)))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def score_prompts(model, spec: SteerSpec, input_ids, attention_mask, **model_kwargs) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """A clean scoring pass: returns ``(gate, score)`` with ``gate_in = -1``. ``model_kwargs``: e.g. the
    ``pixel_values`` of a vision-language model."""
    with steered(model, spec) as state:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        return state.gate.clone(), state.score.clone()


@torch.no_grad()
def reference_generate(model, spec: SteerSpec, input_ids, attention_mask, max_new_tokens: int = 8,
                       **generate_kwargs):
    """Greedy generation with the gate latched at prefill. Returns ``(sequences, gate, score)``.
    ``pixel_values`` (and ``image_sizes``) in ``generate_kwargs`` reach the scoring pass too."""
    extra = {k: generate_kwargs[k] for k in ("pixel_values", "image_sizes") if k in generate_kwargs}
    gate, score = score_prompts(model, spec, input_ids, attention_mask, **extra)
    with steered(model, spec) as state:
        state.gate_in = gate
        generate_kwargs.setdefault("do_sample", False)
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, **generate_kwargs)
    return sequences, gate, score
