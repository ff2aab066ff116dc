"""A gate re-thresholded for the quantised graph that ships (issue 20).

Weight quantisation moves the gate's score: the residuals the gate reads at its layers come out of quantised
MatMuls. On SmolLM2 the shift is mostly systematic (int4 round-to-nearest lowers the score of nearly every prompt),
so a gate calibrated on the float model and shipped on the int4 graph lets harmful prompts through. The remedy
here keeps the gate's fitted weights and moves only its bias: both graphs score the pack's own *calibration*
prompts (the corpus prompts the pack records by sha256, without its validation split), and the bias is shifted by
the int4 score at the float threshold, read off a least-squares line through the prompts nearest the threshold.
The held-out prompts of :func:`aligner_export.hf.export.validate_weights` never enter this fit; they measure it.

The new bias is written into the deciding SteerGate node of the quantised graph (its ``bias`` attribute, or the
``bias`` Constant of the inline form) before the integrity digests are computed, and into the manifest's ``bias``
and ``gate.bias``; the manifest's ``weights.gate_bias`` records the float bias, the shift and the fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from aligner_runtime.contract import ATTENTION_MASK, GATE_OUT, INPUT_IDS, SCORE_OUT, position_ids
from aligner_runtime.errors import AlignerError
from aligner_runtime.prompts import prompts_sha256

from aligner_export import corpus
from aligner_export.graph import onnx_ops
from aligner_export.hf.modeling import chat_texts, tokenize_batch
from aligner_export.hf.validate import OrtLM, ort_session

# Calibration prompts scored on both graphs (each class sampled alike); enough to place the line near the threshold
# (the prompts within NEAR_SHARE of it), and a few minutes of scoring prefill on two loaded cores.
DEFAULT_PROMPTS = 384
NEAR_SHARE = 0.5
MAX_PROMPT_TOKENS = 256


def calibration_prompts(pack, limit: int = DEFAULT_PROMPTS, seed: int = 0) -> list[tuple[str, str | None]]:
    """``(prompt, system)`` pairs from the pack's calibration split: the shipped corpus's calibration sets, checked
    against the sha256 the pack records, without the pack's ``val_indices``; a class-balanced random sample of at
    most ``limit``. A pack calibrated on other prompt files (whose text it does not hold) is refused."""
    meta = pack.meta
    recorded = meta.get("prompts") or {}
    pack_seed = int(meta.get("seed", 0))
    sets = corpus.calibration_sets(corpus.load_corpus(), corpus.load_templates(), pack_seed)
    groups = {"harmful": sets.harmful, "harmless": sets.harmless, "extras": sets.extras}
    for name, records in groups.items():
        expected = (recorded.get(name) or {}).get("sha256")
        if expected != prompts_sha256(r.prompt for r in records):
            raise AlignerError(f"the pack's {name} calibration prompts are not the shipped corpus's (sha256 differs): "
                               "it was calibrated on other prompt files, so its gate cannot be re-thresholded here "
                               "(use --gate-threshold float, or --quant-method hqq)")
    rng = np.random.default_rng(seed)
    chosen = []
    per_group = max(1, limit // len(groups))
    for name, records in groups.items():
        val = set((recorded.get(name) or {}).get("val_indices") or [])  # the pack's validation part stays out
        pool = np.array([i for i in range(len(records)) if i not in val], dtype=np.int64)
        take = rng.choice(pool, size=min(per_group, pool.size), replace=False)
        chosen += [(records[i].prompt, records[i].system) for i in np.sort(take)]
    return chosen


def gate_scores(model_path: Path, tokenizer, prompts, padding_side: str, batch_size: int = 8) -> np.ndarray:
    """The gate's score (``steer_score``) of each ``(prompt, system)`` in a scoring prefill (``steer_gate_in = -1``)
    on ONNX Runtime."""
    lm = OrtLM(ort_session(model_path))
    scores = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        texts, _, _ = chat_texts(tokenizer, [p for p, _ in chunk], [s for _, s in chunk])
        batch = tokenize_batch(tokenizer, texts, padding_side=padding_side)
        ids = batch[INPUT_IDS].numpy()[:, -MAX_PROMPT_TOKENS:] if padding_side == "left" else \
            batch[INPUT_IDS].numpy()[:, :MAX_PROMPT_TOKENS]
        mask = batch[ATTENTION_MASK].numpy().astype(np.int64)
        mask = mask[:, -MAX_PROMPT_TOKENS:] if padding_side == "left" else mask[:, :MAX_PROMPT_TOKENS]
        rows = ids.shape[0]
        out = lm.step(ids, mask, position_ids(mask), lm.empty_past(rows), np.full(rows, -1.0, np.float32))
        scores.append(out[SCORE_OUT].astype(np.float64))
        del out
    return np.concatenate(scores)


def bias_shift(reference: np.ndarray, quantized: np.ndarray, near_share: float = NEAR_SHARE) -> dict:
    """How far the quantised graph's threshold lies from the float graph's, from the scores of the same prompts on
    both (the gate fires at ``score > 0``): the least-squares line ``quantized ≈ a · reference + c`` through the
    ``near_share`` of prompts nearest the float threshold, read at ``reference = 0``; the quantised gate then
    decides ``quantized - c > 0``. Returns the shift ``-c`` (to add to the bias) and what it did on these prompts."""
    reference, quantized = np.asarray(reference, np.float64), np.asarray(quantized, np.float64)
    if reference.shape != quantized.shape or reference.size < 8:
        raise AlignerError("re-thresholding the gate needs the scores of at least 8 prompts on both graphs")
    near = np.argsort(np.abs(reference))[:max(8, int(round(reference.size * near_share)))]
    slope, intercept = np.polyfit(reference[near], quantized[near], 1)
    if not np.isfinite(intercept) or slope <= 0:
        raise AlignerError(f"the quantised gate's scores do not follow the float gate's (slope {slope:.3g}): "
                           "re-thresholding cannot repair it")
    shift = -float(intercept)
    before = float(np.mean((reference > 0) == (quantized > 0)))
    after = float(np.mean((reference > 0) == (quantized + shift > 0)))
    return {"shift": shift, "slope": float(slope), "prompts": int(reference.size), "fit_prompts": int(near.size),
            "calibration_agreement_before": before, "calibration_agreement_after": after,
            "mean_score_shift": float(np.mean(quantized - reference))}


def set_gate_bias(model, gate_name: str, bias: float) -> None:
    """Writes ``bias`` into the deciding SteerGate ``gate_name`` of ``model`` (an ``onnx.ModelProto``): the node's
    ``bias`` attribute (function form) or its ``bias`` Constant (inline form)."""
    if not np.isfinite(bias):
        raise AlignerError(f"the re-thresholded gate bias is not finite ({bias})")
    for node in model.graph.node:
        if node.name == gate_name and node.domain == onnx_ops.DOMAIN:
            for attr in node.attribute:
                if attr.name == "bias":
                    attr.CopyFrom(helper.make_attribute("bias", float(bias)))
                    return
        if node.op_type == "Constant" and list(node.output) == [f"{gate_name}/bias"]:
            for attr in node.attribute:
                if attr.name == "value_float":
                    attr.CopyFrom(helper.make_attribute("value_float", float(bias)))
                    return
    raise AlignerError(f"the quantised graph has no SteerGate {gate_name} bias to re-threshold")

