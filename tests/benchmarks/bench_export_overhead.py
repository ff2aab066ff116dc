"""Steering overhead of the exported graph: steered vs unsteered SmolLM2 on ONNX Runtime CPU (issue 3, "Speed").

    .venv/bin/python tests/benchmarks/bench_export_overhead.py [--target DIR] [--pack PACK] [--threads 2]
                                                             [--rounds 15] [--out report.json]

1. Exports the model twice in child processes (so each one's peak memory is its own): steered with the pack (random
   unit vectors with a splitting bias when no pack is given; the cost of SteerGate/SteerShift does not depend on
   the vectors) and unsteered (the plain optimum export). Reports wall time and peak RSS of each.
2. Loads both graphs in ONNX Runtime (CPU EP, ``--threads`` intra-op threads, ORT_ENABLE_ALL) and, interleaved in
   alternating order, times a 64-token prefill (batch 1) and ``--decode`` decode steps after it.
3. Prints medians and steered/unsteered ratios for prefill latency and decode tokens/s (target: overhead <= 2%).

The steered graph runs with the gate forced to 1 (``--gate 1``, default) so the shifts really execute; ``--gate -1``
lets the gate decide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
mode, target, out = sys.argv[1:4]
if mode == "steered":
    from aligner_export.commands.cli import main
    rc = main(["export", "--target", target, "--pack", sys.argv[4], "-o", out, "--no-validate"])
    assert rc == 0
else:
    from aligner_export.hf.export import base_export
    from aligner_export.hf.families import family_for
    from aligner_export.hf.modeling import load_model
    model, _ = load_model(target)
    base_export(model, __import__("pathlib").Path(out), family_for(model.config))
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child_export(mode: str, target: Path, out: Path, pack: Path | None) -> dict:
    args = [sys.executable, "-c", CHILD, mode, str(target), str(out)] + ([str(pack)] if pack else [])
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_once(sess, ids: np.ndarray, decode: int, gate: float) -> tuple[float, float]:
    """Returns (prefill seconds, decode tokens/s) for one prompt."""
    from aligner_export.hf.validate import OrtLM

    lm = OrtLM(sess)
    steered = "steer_gate_in" in lm.inputs
    n = ids.shape[1]
    mask = np.ones((1, n), np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(n)[None], **lm.empty_past(1)}
    if steered:
        feeds["steer_gate_in"] = np.array([gate], np.float32)
    t0 = time.perf_counter()
    out = dict(zip(lm.outputs, sess.run(None, feeds)))
    prefill = time.perf_counter() - t0
    token = out["logits"][:, -1].argmax(-1).reshape(1, 1)
    past = {p: out[p.replace("past_key_values.", "present.")] for p in lm.past_names}
    latched = out["steer_gate"] if steered else None
    t0 = time.perf_counter()
    for step in range(decode):
        mask = np.ones((1, n + step + 1), np.int64)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": np.array([[n + step]]), **past}
        if steered:
            feeds["steer_gate_in"] = latched
        out = dict(zip(lm.outputs, sess.run(None, feeds)))
        token = out["logits"][:, -1].argmax(-1).reshape(1, 1)
        past = {p: out[p.replace("past_key_values.", "present.")] for p in lm.past_names}
    return prefill, decode / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="model dir (default: the embedded SmolLM2)")
    parser.add_argument("--pack", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--gate", type=float, default=1.0)
    parser.add_argument("--work", default=None, help="keep the exports here (default: a temporary dir)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from aligner_export.hf import zoo

    target = Path(args.target) if args.target else zoo.ensure_target()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    pack = Path(args.pack) if args.pack else work / "pack.safetensors"
    if not pack.exists():
        from export_packs import make_pack

        make_pack(target, pack, gate_layer=12, steer_layers=range(10, 21))
    exports = {}
    for mode in ("steered", "unsteered"):
        out = work / mode
        if not (out / "model.onnx").exists():
            exports[mode] = child_export(mode, target, out, pack if mode == "steered" else None)
            print(f"{mode} export: {exports[mode]['seconds']:.1f} s, peak RSS {exports[mode]['peak_rss_mb']:.0f} MB")
    sessions = {mode: session(work / mode / "model.onnx", args.threads) for mode in ("steered", "unsteered")}
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 40000, size=(1, args.prefill))
    for mode in sessions:  # warm-up
        run_once(sessions[mode], ids, 4, args.gate)
    samples = {mode: {"prefill_s": [], "decode_tok_s": []} for mode in sessions}
    for r in range(args.rounds):
        order = ("steered", "unsteered") if r % 2 == 0 else ("unsteered", "steered")
        for mode in order:
            prefill, tok_s = run_once(sessions[mode], ids, args.decode, args.gate)
            samples[mode]["prefill_s"].append(prefill)
            samples[mode]["decode_tok_s"].append(tok_s)
    med = {mode: {k: statistics.median(v) for k, v in s.items()} for mode, s in samples.items()}
    report = {
        "target": str(target), "threads": args.threads, "rounds": args.rounds, "prefill_tokens": args.prefill,
        "decode_tokens": args.decode, "gate": args.gate, "exports": exports, "median": med,
        "prefill_latency_ratio": med["steered"]["prefill_s"] / med["unsteered"]["prefill_s"],
        "decode_throughput_ratio": med["steered"]["decode_tok_s"] / med["unsteered"]["decode_tok_s"],
    }
    print(f"prefill {args.prefill} tokens, median: steered {med['steered']['prefill_s'] * 1e3:.2f} ms, unsteered "
          f"{med['unsteered']['prefill_s'] * 1e3:.2f} ms -> latency ratio {report['prefill_latency_ratio']:.4f}")
    print(f"decode, median: steered {med['steered']['decode_tok_s']:.1f} tok/s, unsteered "
          f"{med['unsteered']['decode_tok_s']:.1f} tok/s -> throughput ratio {report['decode_throughput_ratio']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
