"""Step 5 of the export pipeline (:mod:`aligner_export.hf.export`), ``--weights int8|int4``: the validated float
graph becomes the reference, its MatMul weights are quantized (:mod:`aligner_export.graph.quantize`; the steering
stays float32) and :func:`validate_weights` compares the quantized graph with it on ONNX Runtime: gate decisions on
held-out prompts (every disagreement reported) and logits within a tolerance derived from the weights' own
quantization error (docs/performance.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from aligner_runtime.contract import (ATTENTION_MASK, GATE_OUT, INPUT_IDS, LOGITS, METADATA_PREFIX, MODEL_FILE,
                                      SCORE_OUT, Key, position_ids)
from aligner_runtime.errors import AlignerError, atomic_path
from aligner_runtime.prompts import load_prompts

from aligner_export import progress
from aligner_export.corpus import PROMPTS_DIR
from aligner_export.graph import quantize
from aligner_export.graph.files import save_proto
from aligner_export.graph.manifest import write_metadata
from aligner_export.hf.modeling import chat_texts, tokenize_batch
from aligner_export.hf.validate import PROMPTS
from aligner_export.ort import OrtLM, ort_session


# The quantized graph's logits against the float graph's, as a relative RMS error over the vocabulary at each compared
# position, averaged over the positions, may reach LOGIT_ERROR_GAIN times the relative error the quantization puts
# into a MatMul: the weights' own relative Frobenius error (measured on the export's tensors) plus, at accuracy level
# 4, the int8 block quantization of the activations (ACTIVATION_ERROR: a rounding step of absmax/127 over
# activations whose absmax is ~3x their RMS gives 3 / (127 * sqrt(12)) ~ 0.007). The gain covers the error's growth
# through the depth of the network; docs/performance.md gives the measured ratios (1.5-3.6 on SmolLM2 and the tiny
# models, int8 and int4), so 8 leaves a margin of 2 or more and still fails a broken graph (relative error ~1).
LOGIT_ERROR_GAIN = 8.0
ACTIVATION_ERROR = 0.007
HELDOUT_PROMPTS = ("harmful_heldout.txt", "harmless_heldout.txt")


def weight_validation_prompts() -> list[tuple[str, str]]:
    """``(set, prompt)`` pairs: the shipped held-out prompt sets (never used by calibration) and the validation
    pair of :mod:`aligner_export.hf.validate`."""
    pairs = [("validation", p) for p in PROMPTS]
    for name in HELDOUT_PROMPTS:
        pairs += [(name.split("_")[0], p) for p in load_prompts(PROMPTS_DIR / name)]
    return pairs


def _last_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's logits at its last real position (left or right padding)."""
    width = mask.shape[1]
    last = width - 1 - np.argmax(mask[:, ::-1], axis=1)
    offset = width - logits.shape[1]
    return logits[np.arange(logits.shape[0]), last - offset]


def validate_weights(reference_path: Path, model_path: Path, tokenizer, fmt, weight_error: float,
                     padding_side: str, prompts=None, min_agreement: float = 0.99, batch_size: int = 8,
                     decode_steps: int = 3, log=print) -> dict:
    """The quantized graph against the float graph it was made from, both on ONNX Runtime.

    - Gates: a scoring prefill (``steer_gate_in = -1``) of every prompt on both; each disagreement is reported with
      both scores. Fails below ``min_agreement``.
    - Logits: at each row's last prompt position, then over ``decode_steps`` greedy decode steps of the first batch
      (the float graph's tokens and gates fed to both): relative RMS error over the vocabulary, its mean bounded
      by ``LOGIT_ERROR_GAIN * (weight_error + ACTIVATION_ERROR at accuracy level 4)``; its maximum and the greedy
      top-1 agreement are reported.
    """
    pairs = list(prompts) if prompts else weight_validation_prompts()
    reference, quantized = OrtLM(ort_session(reference_path)), OrtLM(ort_session(model_path))

    disagreements, rel_errors, top1 = [], [], []
    agree = 0
    for first in progress.iterate(range(0, len(pairs), batch_size), f"{fmt.name} vs float", "batch"):
        chunk = pairs[first:first + batch_size]
        texts, _, _ = chat_texts(tokenizer, [p for _, p in chunk])
        batch = tokenize_batch(tokenizer, texts, padding_side=padding_side)
        ids, mask = batch[INPUT_IDS].numpy(), batch[ATTENTION_MASK].numpy().astype(np.int64)
        pos = position_ids(mask)
        rows = ids.shape[0]
        outs = [lm.step(ids, mask, pos, lm.empty_past(rows), np.full(rows, -1.0, np.float32))
                for lm in (reference, quantized)]
        for i, (which, prompt) in enumerate(chunk):
            gates = [float(o[GATE_OUT][i]) for o in outs]
            if gates[0] == gates[1]:
                agree += 1
            else:
                disagreements.append({"set": which, "prompt": prompt, "reference_gate": gates[0],
                                      "gate": gates[1], "reference_score": float(outs[0][SCORE_OUT][i]),
                                      "score": float(outs[1][SCORE_OUT][i])})
        logits = [_last_logits(o[LOGITS], mask).astype(np.float64) for o in outs]
        rel_errors += list(np.linalg.norm(logits[1] - logits[0], axis=-1) / np.linalg.norm(logits[0], axis=-1))
        top1 += list(logits[0].argmax(-1) == logits[1].argmax(-1))
        if first == 0 and decode_steps:
            gate = outs[0][GATE_OUT].astype(np.float32)
            steps = [lm.step(ids, mask, pos, lm.empty_past(rows), gate) for lm in (reference, quantized)]
            step_mask = mask
            for _ in range(decode_steps):
                token = _last_logits(steps[0][LOGITS], step_mask).argmax(-1).reshape(rows, 1).astype(np.int64)
                step_mask = np.concatenate([step_mask, np.ones((rows, 1), np.int64)], axis=1)
                step_pos = position_ids(step_mask)[:, -1:]
                steps = [lm.step(token, step_mask, step_pos, s["past"], gate)
                         for lm, s in zip((reference, quantized), steps)]
                a, b = (s[LOGITS][:, -1].astype(np.float64) for s in steps)
                rel_errors += list(np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1))
                top1 += list(a.argmax(-1) == b.argmax(-1))
    count = len(pairs)
    tolerance = LOGIT_ERROR_GAIN * (weight_error + (ACTIVATION_ERROR if fmt.accuracy_level == 4 else 0.0))
    result = {
        "format": fmt.name, "reference": "the validated float graph of this export", "prompts": count,
        "prompt_sets": "validate.PROMPTS + data/prompts/harmful_heldout.txt + harmless_heldout.txt"
        if not prompts else "given", "padding_side": padding_side,
        "gates_agree": agree, "gate_agreement": agree / count, "min_gate_agreement": min_agreement,
        "gate_disagreements": disagreements,
        "missed": sum(d["reference_gate"] > d["gate"] for d in disagreements),
        "weight_rel_error": weight_error, "logit_rel_rms": float(max(rel_errors)),
        "logit_rel_rms_mean": float(np.mean(rel_errors)),
        "logit_rel_rms_tolerance": tolerance,
        "tolerance_rule": f"mean relative RMS logit error <= {LOGIT_ERROR_GAIN:g} x (relative weight error"
                          f"{f' + {ACTIVATION_ERROR:g} int8 activations' if fmt.accuracy_level == 4 else ''})",
        "top1_agreement": float(np.mean(top1)), "decode_steps": decode_steps,
    }
    for d in disagreements:
        log(f"  gate disagreement ({d['set']}): float {d['reference_gate']:.0f} (score {d['reference_score']:+.3f}) "
            f"vs {fmt.name} {d['gate']:.0f} (score {d['score']:+.3f}): {d['prompt'][:70]!r}")
    if agree / count < min_agreement:
        raise AlignerError(f"{fmt.name} weights: the gate agrees with the float graph on {agree}/{count} held-out "
                           f"prompts ({agree / count:.1%} < {min_agreement:.0%}); the quantized gate is not "
                           f"trustworthy (lower --min-gate-agreement only knowingly)")
    if not result["logit_rel_rms_mean"] <= tolerance:
        raise AlignerError(f"{fmt.name} weights: relative logit error {result['logit_rel_rms_mean']:.3g} exceeds "
                           f"{tolerance:.3g} ({result['tolerance_rule']}, weight error {weight_error:.3g})")
    return result


def weight_metadata(manifest: dict) -> dict[str, str]:
    """``inferaligner.weights`` for the graph's metadata_props (the manifest's ``weights``, JSON)."""
    return {METADATA_PREFIX + Key.WEIGHTS: json.dumps(manifest[Key.WEIGHTS], sort_keys=True)}


def add_weight_metadata(model_path: Path, manifest: dict) -> None:
    """Puts ``inferaligner.weights`` back after ``write_metadata`` (which writes the shared key facts only)."""
    model = onnx.load(str(model_path), load_external_data=False)
    wanted = weight_metadata(manifest)
    present = {p.key: p.value for p in model.metadata_props}
    if all(present.get(k) == v for k, v in wanted.items()):
        return
    kept = [p for p in model.metadata_props if p.key not in wanted]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in wanted.items():
        model.metadata_props.add(key=key, value=value)
    with atomic_path(model_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def quantize_export(out_dir: Path, model_path: Path, manifest: dict, fmt, tokenizer, padding_side: str,
                    options, log=print) -> None:
    """Replaces ``model.onnx`` by its weight-quantized form and, when ``options`` (the export's
    :class:`~aligner_export.hf.export.ExportOptions`) validate, compares it with the float graph
    (:func:`validate_weights`); the float graph is removed afterwards."""
    reference_dir = Path(tempfile.mkdtemp(prefix=".reference.", dir=out_dir))
    try:
        reference_path = reference_dir / MODEL_FILE
        for path in list(out_dir.glob(MODEL_FILE + "*")):
            path.rename(reference_dir / path.name)
        reference = onnx.load(str(reference_path))
        quantized = quantize.quantize(onnx.load(str(reference_path)), fmt)
        if not quantize.steering_constants_unchanged(reference, quantized):
            raise AlignerError("weight quantization changed a steering node or function; refusing the export")
        weight_error = quantize.relative_weight_error(reference, quantized)
        del reference
        save_proto(quantized, model_path)
        del quantized
        log(f"weights quantized to {fmt.name} (MatMulNBits, block {fmt.block_size}); relative weight error "
            f"{weight_error:.4f}")
        if options.validate:
            result = validate_weights(reference_path, model_path, tokenizer, fmt, weight_error, padding_side,
                                      prompts=options.weight_prompts, min_agreement=options.gate_agreement, log=log)
            manifest[Key.VALIDATION]["weights"] = result
            write_metadata(model_path, manifest)
            log(f"{fmt.name} vs float graph: gates agree on {result['gates_agree']}/{result['prompts']} prompts, "
                f"relative logit error mean {result['logit_rel_rms_mean']:.3g} (tolerance "
                f"{result['logit_rel_rms_tolerance']:.3g}), max {result['logit_rel_rms']:.3g}; greedy top-1 "
                f"agreement {result['top1_agreement']:.3f}")
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)
