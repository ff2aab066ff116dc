"""The int4 gate study of issue 20 (docs/performance.md "int4 with the gate intact"): one float export quantised
in several int4 forms, each compared with the float graph on the 134 held-out prompts (the export's own
``validate_weights``), and, with ``--rethreshold``, its gate's bias moved to where the quantised scores put the float
threshold, fitted on the pack's *calibration* prompts and measured again on the held-out ones.

    PYTHONPATH=export:runtime .venv/bin/python tests/benchmarks/int4_gate_study.py --export FLOAT_EXPORT \
        --pack PACK --work DIR --forms rtn,hqq-kernel,rtn-gate8 [--rethreshold] [--prompts 384]

Forms: ``rtn`` (every MatMul 4-bit, round to nearest), ``hqq`` (HQQ, float zero points split exactly),
``hqq-kernel`` (HQQ folded into integer zero points), ``rtn-gate8`` (the default: the gate's path at 8 bits),
``rtn-gate8-acc0`` (the same with the gate path's MatMulNBits at accuracy level 0, float activations), ``int8``
(every MatMul 8-bit, ``--weights int8``). With ``--speed`` each form's decode speed is timed against ``rtn-gate8``
(batch 1, 2 threads, 64 prompt tokens, 32 new, gate forced open, 7 interleaved rounds).

Why the re-threshold is a study and not the export: it raised RTN's agreement from 110/134 to 121/134 on SmolLM2
(the quantised scores are compressed and noisy near the threshold, not just shifted), far from the 99% the export
asks; keeping the gate's path at 8 bits gave 134/134 with no fit at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from aligner_export import corpus
from aligner_export.graph import onnx_ops
from aligner_export.graph import quantize as Q
from aligner_export.graph.files import save_proto as _save_proto
from aligner_export.hf.weights import validate_weights
from aligner_export.hf.modeling import chat_texts, tokenize_batch
from aligner_export.ort import OrtLM, ort_session
from aligner_export.pack import load_pack
from aligner_runtime.contract import ATTENTION_MASK, INPUT_IDS, SCORE_OUT, position_ids
from aligner_runtime.errors import AlignerError
from aligner_runtime.prompts import prompts_sha256

# form: (method, zero points, gate path bits, gate path accuracy level or None, bits)
FORMS = {"rtn": ("rtn", "exact", 4, None, 4), "hqq": ("hqq", "exact", None, None, 4),
         "hqq-kernel": ("hqq", "kernel", None, None, 4), "rtn-gate8": ("rtn", "exact", 8, None, 4),
         "rtn-gate8-acc0": ("rtn", "exact", 8, 0, 4), "int8": ("rtn", "exact", 8, None, 8)}

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
                               "it was calibrated on other prompt files, whose text it does not hold")
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


def set_gate_path_accuracy(model, level: int) -> int:
    """Sets ``accuracy_level`` on the MatMulNBits nodes of the gate's path (layers 0..g*); returns their count."""
    import re

    last = Q.gate_layer(model)
    path = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"
            and (m := re.match(r"^/model/layers\.(\d+)/", n.name)) and int(m.group(1)) <= last]
    for node in model.graph.node:
        if node.name in path:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    return len(path)


def decode_speed(paths: dict[str, Path], rounds: int = 7, prompt: int = 64, new: int = 32) -> dict:
    """Decode tokens per second of each graph, batch 1, 2 threads, the gate forced open, interleaved rounds (the
    order alternates); medians and each form's median ratio to the first."""
    from aligner_runtime.contract import LOGITS

    sessions = {k: OrtLM(ort_session(p, threads=2)) for k, p in paths.items()}
    ids = np.random.default_rng(0).integers(100, 20000, size=(1, prompt)).astype(np.int64)

    def run(lm):
        mask = np.ones((1, prompt), np.int64)
        out = lm.step(ids, mask, position_ids(mask), lm.empty_past(1), np.ones(1, np.float32))
        start = time.perf_counter()
        for _ in range(new):
            token = out[LOGITS][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            out = lm.step(token, mask, position_ids(mask)[:, -1:], out["past"], np.ones(1, np.float32))
        return new / (time.perf_counter() - start)

    speeds = {k: [] for k in sessions}
    for r in range(rounds):
        for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            speeds[k].append(run(sessions[k]))
    first = next(iter(speeds))
    return {k: {"tok_s_median": float(np.median(v)),
                "ratio_to_" + first: float(np.median(np.array(v) / np.array(speeds[first])))}
            for k, v in speeds.items()}


def _summary(result: dict) -> dict:
    keep = {k: result[k] for k in ("gates_agree", "prompts", "missed", "logit_rel_rms_mean", "logit_rel_rms",
                                   "top1_agreement", "weight_rel_error")}
    keep["disagreements"] = [(d["set"], round(d["reference_score"], 3), round(d["score"], 3))
                             for d in result["gate_disagreements"]]
    return keep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="a validated float export directory")
    parser.add_argument("--pack", required=True, help="the pack it was exported from (its calibration prompts)")
    parser.add_argument("--work", required=True)
    parser.add_argument("--forms", default="rtn,hqq-kernel,rtn-gate8")
    parser.add_argument("--rethreshold", action="store_true")
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS)
    parser.add_argument("--speed", action="store_true", help="time each form's decode against rtn-gate8")
    args = parser.parse_args()
    # deferred: transformers only for this study's tokenizer
    from transformers import AutoTokenizer

    source, work = Path(args.export), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((source / "inferaligner.json").read_text())
    padding = "right" if manifest["exporter"] == "onnxruntime-genai" else "left"
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    reference_path = source / "model.onnx"
    reference_scores = None
    for form in args.forms.split(","):
        method, zero_points, gate_bits, gate_accuracy, bits = FORMS[form]
        fmt = Q.WeightFormat(f"int{bits}", bits, 32, 4, method, zero_points, None if gate_bits == bits else gate_bits)
        out = work / form
        out.mkdir(exist_ok=True)
        start = time.time()
        reference = onnx.load(str(reference_path))
        quantized = Q.quantize(onnx.load(str(reference_path)), fmt)
        if gate_accuracy is not None:
            set_gate_path_accuracy(quantized, gate_accuracy)
        error = Q.relative_weight_error(reference, quantized)
        del reference
        _save_proto(quantized, out / "model.onnx")
        del quantized
        result = validate_weights(reference_path, out / "model.onnx", tokenizer, fmt, error, padding,
                                  min_agreement=0.0, log=lambda *_: None)
        row = {"form": form, "quantise_and_validate_s": round(time.time() - start), **_summary(result)}
        if args.rethreshold:
            prompts = calibration_prompts(load_pack(args.pack), args.prompts)
            if reference_scores is None:
                reference_scores = gate_scores(reference_path, tokenizer, prompts, padding)
            fit = bias_shift(reference_scores, gate_scores(out / "model.onnx", tokenizer, prompts, padding))
            model = onnx.load(str(out / "model.onnx"))
            last = max(manifest["gate"].get("layers") or [manifest["gate_layer"]])
            gate_name = f"/model/layers.{last}/steer/SteerGate"
            set_gate_bias(model, gate_name, manifest["bias"] + fit["shift"])
            _save_proto(model, out / "model.onnx")
            del model
            again = validate_weights(reference_path, out / "model.onnx", tokenizer, fmt, error, padding,
                                     min_agreement=0.0, decode_steps=0, log=lambda *_: None)
            row["rethreshold"] = {**fit, "gates_agree": again["gates_agree"], "missed": again["missed"]}
        print(json.dumps(row), flush=True)
        if not args.speed:
            shutil.rmtree(out)
    if args.speed:
        forms = args.forms.split(",")
        if "rtn-gate8" not in forms:
            raise AlignerError("--speed times the forms against rtn-gate8: include it in --forms")
        order = ["rtn-gate8"] + [f for f in forms if f != "rtn-gate8"]
        print(json.dumps({"decode": decode_speed({f: work / f / "model.onnx" for f in order})}), flush=True)
        for f in forms:
            shutil.rmtree(work / f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
