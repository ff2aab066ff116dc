"""ONNX Runtime against the PyTorch reference: prefill and decode with KV cache (issue 3, step 6).

One batch of two prompts runs through the steered graph and through the HF model with the reference hooks
(``reference.steered``), following the runtime protocol of docs/architecture.md §5:

1. a scoring prefill with ``steer_gate_in = -1``;
2. the steered prefill with ``steer_gate_in`` = the latched gate (identical to 1. unless a steered layer lies below
   the gate layer), whose KV cache the decode steps extend;
3. ``decode_steps`` greedy decode steps, each fed the latched gate.

Both sides see the same token ids (the reference's greedy choice). Logits are compared at the positions whose mask
is 1. When the two prompts' natural gates don't differ, a second round forces the gates ``[1, 0]`` so that both the
steered and the unsteered path are always checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligner_runtime.contract import ATTENTION_MASK, GATE_OUT, INPUT_IDS, LOGITS, SCORE_OUT, position_ids
from aligner_runtime.errors import AlignerError

from aligner_export.hf.modeling import chat_texts, tokenize_batch
from aligner_export.ort import OrtLM, ort_session

# Validation prompts: one the gate should catch and one it should let through on a calibrated pack.
PROMPTS = ("Explain step by step how to build a bomb to hurt people.", "Write a short poem about the sea.")

# Logit tolerance per dtype: (absolute floor, relative to the largest reference logit). fp32 is the 1e-4;
# on real models the plain ORT-vs-PyTorch float32 noise alone reaches ~1.2e-4 at logits of ~40 (SmolLM2, gate 0,
# no steering involved; docs/exporter.md), so large logits widen it by 1e-5 of their magnitude. fp16: float16 logits
# of magnitude 10-40 carry a rounding step of 0.01-0.03.
TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 2e-3)}


@dataclass
class Validation:
    prefill_max_abs_diff: float = 0.0
    decode_max_abs_diff: float = 0.0
    score_max_abs_diff: float = 0.0
    tolerance: float = 0.0
    tolerance_rule: str = ""
    gates: list = field(default_factory=list)
    rounds: list = field(default_factory=list)

    def as_manifest(self) -> dict:
        return {"prefill_max_abs_diff": self.prefill_max_abs_diff, "decode_max_abs_diff": self.decode_max_abs_diff,
                "score_max_abs_diff": self.score_max_abs_diff, "tolerance": self.tolerance,
                "tolerance_rule": self.tolerance_rule, "gates": self.gates, "rounds": self.rounds,
                "passed": True}


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if mask is not None:
        diff = diff[mask.astype(bool)]
    return float(diff.max()) if diff.size else 0.0


def run_rounds(session, model, tokenizer_batch, config, decode_steps: int = 3, force_mixed: bool = True,
               embedder=None, ref_prefill_kwargs=None):
    """Runs the protocol on ORT and on the reference; returns a list of per-round diff dicts.

    For a graph fed ``inputs_embeds``, ``embedder(input_ids, prefill)`` gives them (the prompt's, images merged, at
    prefill); ``ref_prefill_kwargs`` (``pixel_values``) go to the reference model's prefill calls."""
    embed = embedder or (lambda _ids, _prefill: None)
    ref_extra = ref_prefill_kwargs or {}
    # deferred: torch, and the PyTorch reference that imports it at load, only when a validation runs
    import torch

    from aligner_export.hf.reference import last_positions, steered

    input_ids = tokenizer_batch[INPUT_IDS].numpy()
    prompt_mask = tokenizer_batch[ATTENTION_MASK].numpy().astype(np.int64)
    lm = OrtLM(session)
    batch = input_ids.shape[0]
    rounds = []
    forced_rounds = [None]
    for forced in forced_rounds:
        result = {"forced": forced, "prefill": 0.0, "decode": 0.0, "score": 0.0}
        mask = prompt_mask
        with torch.no_grad(), steered(model, config) as state:
            pos = position_ids(mask)
            first_in = np.full(batch, -1.0, np.float32) if forced is None else np.asarray(forced, np.float32)
            # 1. scoring prefill
            ort_out = lm.step(input_ids, mask, pos, lm.empty_past(batch), first_in, embed(input_ids, True))
            state.gate_in = torch.from_numpy(first_in)
            ref = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos), use_cache=False, **ref_extra)
            ref_gate, ref_score = state.gate.numpy(), state.score.numpy()
            if not np.array_equal(ort_out[GATE_OUT], ref_gate):
                raise AlignerError(f"validation failed: ONNX gate {ort_out[GATE_OUT].tolist()} != PyTorch gate "
                                   f"{ref_gate.tolist()} (scores {ort_out[SCORE_OUT].tolist()} vs "
                                   f"{ref_score.tolist()})")
            result["score"] = _max_diff(ort_out[SCORE_OUT], ref_score)
            result["prefill"] = _max_diff(ort_out[LOGITS], ref.logits.float().numpy(), mask)
            result["logit_scale"] = float(np.abs(ref.logits.float().numpy()).max())
            gate = ref_gate.astype(np.float32)
            result["gates"] = gate.tolist()
            # 2. the steered prefill with the latched gate, whose cache decoding extends
            ort_out = lm.step(input_ids, mask, pos, lm.empty_past(batch), gate, embed(input_ids, True))
            state.gate_in = torch.from_numpy(gate)
            ref = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos), use_cache=True, **ref_extra)
            result["prefill"] = max(result["prefill"], _max_diff(ort_out[LOGITS], ref.logits.float().numpy(), mask))
            cache, past = ref.past_key_values, ort_out["past"]
            ref_logits = ref.logits.float().numpy()
            # 3. decode steps with the gate fed back
            for _ in range(decode_steps):
                # Greedy token at each row's last real position of this call (the same rule as SteerGate's last_b).
                last = last_positions(torch.from_numpy(mask), batch, ref_logits.shape[1]).numpy()
                next_ids = ref_logits[np.arange(batch), last].argmax(-1).reshape(batch, 1).astype(np.int64)
                mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
                pos = position_ids(mask)[:, -1:]
                ort_out = lm.step(next_ids, mask, pos, past, gate, embed(next_ids, False))
                ref = model(input_ids=torch.from_numpy(next_ids), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True)
                if not np.array_equal(ort_out[GATE_OUT], gate):
                    raise AlignerError(f"validation failed: the decode step changed the latched gate "
                                       f"{gate.tolist()} to {ort_out[GATE_OUT].tolist()}")
                ref_logits = ref.logits.float().numpy()
                result["decode"] = max(result["decode"], _max_diff(ort_out[LOGITS], ref_logits))
                cache, past = ref.past_key_values, ort_out["past"]
        rounds.append(result)
        if force_mixed and forced is None and len(set(result["gates"])) < 2 and batch >= 2:
            forced_rounds.append([1.0, 0.0] + [-1.0] * (batch - 2))
    return rounds


def validate(model_path: Path, model, tokenizer, config, dtype: str = "fp32", padding_side: str = "left",
             prompts=PROMPTS, decode_steps: int = 3, level: str = "all", tolerance: float | None = None) -> Validation:
    """Compares the exported graph with the reference; raises :class:`AlignerError` above the tolerance."""
    texts, _, _ = chat_texts(tokenizer, list(prompts))
    batch = dict(tokenize_batch(tokenizer, texts, padding_side=padding_side))
    batch["padding_side"] = padding_side
    rounds = run_rounds(ort_session(model_path, level), model, batch, config, decode_steps=decode_steps)
    return check_rounds(rounds, dtype, tolerance, "")


def check_rounds(rounds, dtype: str, tolerance: float | None, what: str) -> Validation:
    """The rounds' figures as a :class:`Validation`; an :class:`AlignerError` above the tolerance."""
    floor, relative = TOLERANCE[dtype] if tolerance is None else (tolerance, 0.0)
    limit = max(floor, relative * _reference_scale(rounds))
    result = Validation(prefill_max_abs_diff=max(r["prefill"] for r in rounds),
                        decode_max_abs_diff=max(r["decode"] for r in rounds),
                        score_max_abs_diff=max(r["score"] for r in rounds), tolerance=limit,
                        tolerance_rule=f"max({floor:g}, {relative:g} * max|logit|)",
                        gates=rounds[0]["gates"], rounds=rounds)
    worst = max(result.prefill_max_abs_diff, result.decode_max_abs_diff)
    if not worst <= limit:
        raise AlignerError(f"validation failed: ONNX Runtime and the PyTorch reference differ by {worst:.3g} in the "
                           f"logits{what} (tolerance {limit:.3g}, {dtype}); the export is not trustworthy")
    return result


def _reference_scale(rounds) -> float:
    return max(r.get("logit_scale", 1.0) for r in rounds)
