"""A steered export on ONNX Runtime's CUDA execution provider against the CPU provider (issue 11).

    python tests/gpu/check_cuda_ep.py --model EXPORT_DIR [EXPORT_DIR ...] [--new-tokens 32] [--prompts 8]
                                      [--provider cuda|tensorrt] [--json out.json]

Needs ``onnxruntime-gpu`` (``pip install -e ".[gpu]"``) and a CUDA device; without them it prints why and exits 0
(skipped), so it also runs, importing everything, on a CPU machine. For each export dir (fp32, fp16 or int4 weights):

1. the gate and score of every prompt (held-out harmful and harmless prompts shipped with the package) on both
   providers: gates must agree, scores within 1e-2 relative (fp16: 5e-2);
2. greedy generation of ``--new-tokens`` tokens for a batch of mixed prompts on both providers: tokens compared up to
   the first divergence (a near-tie may flip under different kernels; the first divergent step is printed);
3. decode tokens/s at batch 1 on each provider (the KV cache stays on the device, I/O binding).

Prints one table; exits 1 when a gate differs. About a minute per export on an H100 for the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "runtime"))
PROMPTS = REPO / "export" / "aligner_export" / "data" / "prompts"


def prompts(count: int) -> list[str]:
    harmful = [p for p in (PROMPTS / "harmful_heldout.txt").read_text().splitlines() if p and not p.startswith("#")]
    harmless = [p for p in (PROMPTS / "harmless_heldout.txt").read_text().splitlines() if p and not p.startswith("#")]
    half = max(1, count // 2)
    return [p for pair in zip(harmful[:half], harmless[:half]) for p in pair]


def cuda_available() -> str | None:
    """None when the CUDA EP can run here, else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider (install onnxruntime-gpu: "
                f"pip install -e '.[gpu]')")
    try:
        import numpy as np

        value = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", 0)
        del value
    except Exception as exc:  # no device, driver mismatch: ORT raises its own types
        return f"no usable CUDA device: {str(exc).splitlines()[0][:120]}"
    return None


def decode_rate(aligner, prompt: str, new_tokens: int) -> float:
    aligner.generate(prompt, max_new_tokens=4)  # warm-up (kernels, allocations)
    start = time.perf_counter()
    result = aligner.generate(prompt, max_new_tokens=new_tokens)
    total = time.perf_counter() - start
    return (result.new_tokens - 1) / max(total - result.prefill_seconds, 1e-9)


def check(export: Path, provider: str, count: int, new_tokens: int) -> dict:
    from aligner_runtime import Aligner

    batch = prompts(count)
    loaded = {name: Aligner.load(export, providers=[name]) for name in ("cpu", provider)}
    assert loaded[provider].providers[0] != "CPUExecutionProvider", loaded[provider].providers
    for a in loaded.values():
        a.stop_token_ids = ()
    dtype = loaded["cpu"].manifest.get("dtype")
    weights = (loaded["cpu"].manifest.get("weights") or {}).get("format", dtype)
    rel = 5e-2 if "fp16" in (dtype, weights) else 1e-2
    scores = {name: a.score(batch) for name, a in loaded.items()}
    gate_diff = [p for p, c, g in zip(batch, scores["cpu"], scores[provider]) if c[0] != g[0]]
    score_err = max(abs(c[1] - g[1]) / max(1.0, abs(c[1])) for c, g in zip(scores["cpu"], scores[provider]))
    gens = {name: a.generate(batch, max_new_tokens=new_tokens, batch_size=len(batch)) for name, a in loaded.items()}
    same_prefix = []
    for c, g in zip(gens["cpu"], gens[provider]):
        n = next((i for i, (x, y) in enumerate(zip(c.token_ids, g.token_ids)) if x != y),
                 min(len(c.token_ids), len(g.token_ids)))
        same_prefix.append(n)
    rates = {name: decode_rate(a, batch[1], new_tokens) for name, a in loaded.items()}
    return {"export": str(export), "weights": weights, "dtype": dtype, "provider": loaded[provider].providers[0],
            "prompts": len(batch), "gate_disagreements": gate_diff, "score_rel_err": score_err,
            "score_tolerance": rel, "tokens_identical_rows": sum(n == new_tokens for n in same_prefix),
            "first_divergence": min(same_prefix), "decode_tok_s_cpu": rates["cpu"],
            "decode_tok_s_gpu": rates[provider]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True, help="export dirs (fp32, fp16, int4 ...)")
    parser.add_argument("--provider", choices=("cuda", "tensorrt"), default="cuda")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reason = cuda_available()
    if reason is not None:
        print(f"SKIPPED: {reason}")
        return 0
    rows = [check(Path(m), args.provider, args.prompts, args.new_tokens) for m in args.model]
    header = (f"{'export':40} {'weights':7} {'EP':22} {'gates':>9} {'score err':>10} {'same tokens':>12} "
              f"{'1st diff':>8} {'CPU tok/s':>10} {'GPU tok/s':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gates = f"{r['prompts'] - len(r['gate_disagreements'])}/{r['prompts']}"
        print(f"{Path(r['export']).name[:40]:40} {r['weights']:7} {r['provider']:22} {gates:>9} "
              f"{r['score_rel_err']:>10.2e} {r['tokens_identical_rows']:>5}/{r['prompts']:<6} "
              f"{r['first_divergence']:>8} {r['decode_tok_s_cpu']:>10.1f} {r['decode_tok_s_gpu']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r["gate_disagreements"] or r["score_rel_err"] > r["score_tolerance"]]
    for r in bad:
        print(f"FAIL {r['export']}: gates differ on {len(r['gate_disagreements'])} prompts, score error "
              f"{r['score_rel_err']:.2e} (tolerance {r['score_tolerance']:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
