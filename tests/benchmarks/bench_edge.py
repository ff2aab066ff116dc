"""Edge speed (issue 11): our steered exports against onnxruntime-genai (and llama.cpp where it built), interleaved.

    .venv/bin/python tests/benchmarks/bench_edge.py --config bench.json [--rounds 5] [--prompt 64] [--new 32]
                                                  [--contexts 64,512,2048] [--threads 2] [--out report.json]

``--config`` names the contestants, each a worker process of its own (so each one's peak RSS is its own):

    {"contestants": [
       {"name": "ours-int4", "kind": "ours", "model": "exports/steered-int4", "gate": 1},
       {"name": "ours-int4-nosteer", "kind": "ours-plain", "model": "genai/int4/model.onnx"},
       {"name": "genai-int4", "kind": "genai", "model": "genai/int4", "python": "~/.cache/.../venv-genai/bin/python"},
       {"name": "llamacpp-q4_0", "kind": "llamacpp", "model": "smollm2-q4_0.gguf", "python": "..."}],
     "ratios": [["ours-int4", "genai-int4"], ...]}

- ``ours``: an export dir through ``aligner_runtime`` (its generation loop, I/O binding, KV cache); ``gate`` 1 forces
  every row steered (every SteerShift runs: the worst case), -1 lets the gate decide (the §5 protocol, two-pass prefill
  for gated rows).
- ``ours-plain``: an unsteered ``.onnx`` (e.g. the builder's own graph) through the same loop: steering off.
- ``genai``: onnxruntime-genai's own generator on a builder directory (its C++ loop and KV cache).
- ``llamacpp``: llama-cpp-python on a GGUF file.

Every worker gets the same synthetic prompt ids (``--prompt`` tokens, fixed seed) and generates ``--new`` tokens
greedily, never stopping early; the KV buffer of every contestant is sized to prompt + new tokens. Per round and
contestant: time to first token (the prefill, TTFT), prefill tokens/s, decode tokens/s. Then decode step time at each
``--contexts`` length (prompt of that length, 16 decode steps). Rounds rotate the order of the contestants. The report
gives medians, the ratios asked for, peak RSS and bytes on disk of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VOCAB_LOW, VOCAB_HIGH = 100, 40000  # ordinary tokens of SmolLM2's vocabulary


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(VOCAB_LOW, VOCAB_HIGH, size=length).tolist()


# --- workers ----------------------------------------------------------------------------------------------------------
class OursWorker:
    def __init__(self, spec: dict, threads: int):
        # deferred: each worker runs in its contestant's venv, which holds only its own runtime
        from aligner_runtime.backends.onnxruntime import OnnxRuntimeBackend

        model = Path(spec["model"]).expanduser()
        self.gate = spec.get("gate", 1)
        self.two_pass = False
        if spec["kind"] == "ours":
            # deferred: as above (the ours workers only)
            from aligner_runtime.manifest import load_export

            export = load_export(model)
            self.two_pass = export.two_pass
            path = export.model_path
        else:
            path = model
        self.backend = OnnxRuntimeBackend(path, intra_op_threads=threads)

    def round(self, prompt: list[int], new: int) -> dict:
        # deferred: as above (the ours workers only)
        from aligner_runtime.generate import GenerationRun, SamplingConfig

        override = None if self.gate == -1 or "steer_gate_in" not in self.backend.input_names else float(self.gate)
        run = GenerationRun(self.backend, [prompt], SamplingConfig(max_new_tokens=new), pad_token_id=0,
                            two_pass=self.two_pass, _gate_override=override)
        start = time.perf_counter()
        steps = iter(run)
        next(steps)  # the prefill and the first token
        ttft = time.perf_counter() - start
        for _ in steps:
            pass
        t = run.timing
        return {"ttft_s": ttft, "prefill_s": t.prefill_seconds, "decode_steps": t.decode_steps,
                "decode_s": t.decode_seconds, "tokens": run.results[0].token_ids}


class GenaiWorker:
    def __init__(self, spec: dict, threads: int):
        # deferred: onnxruntime-genai lives in the genai venv only
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(Path(spec["model"]).expanduser()))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def round(self, prompt: list[int], new: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False, min_length=len(prompt) + new)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        prefill = time.perf_counter() - start
        tokens = [int(generator.get_next_tokens()[0])]
        ttft = time.perf_counter() - start
        decode_start = time.perf_counter()
        steps = 0
        while len(tokens) < new and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            steps += 1
        decode = time.perf_counter() - decode_start
        del generator
        return {"ttft_s": ttft, "prefill_s": prefill, "decode_steps": steps, "decode_s": decode, "tokens": tokens}


class LlamaCppWorker:
    def __init__(self, spec: dict, threads: int):
        # deferred: llama-cpp-python lives in the genai venv only, where it was built
        from llama_cpp import Llama

        self.threads = threads
        self.llm = Llama(model_path=str(Path(spec["model"]).expanduser()), n_ctx=spec.get("n_ctx", 4096),
                         n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False, logits_all=False)

    def _next(self) -> int:
        """Greedy pick from the last evaluated position: with ``logits_all=False`` llama-cpp-python keeps no
        ``scores`` rows (they stay zeros), so the logits are read from the context itself."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def round(self, prompt: list[int], new: int) -> dict:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        tokens = [self._next()]
        ttft = time.perf_counter() - start
        decode_start = time.perf_counter()
        steps = 0
        while len(tokens) < new:
            llm.eval([tokens[-1]])
            tokens.append(self._next())
            steps += 1
        return {"ttft_s": ttft, "prefill_s": prefill, "decode_steps": steps,
                "decode_s": time.perf_counter() - decode_start, "tokens": tokens}


WORKERS = {"ours": OursWorker, "ours-plain": OursWorker, "genai": GenaiWorker, "llamacpp": LlamaCppWorker}


def worker_main(spec: dict, threads: int) -> int:
    worker = WORKERS[spec["kind"]](spec, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        result = worker.round(request["prompt"], request["new"])
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result), flush=True)
    return 0


# --- the orchestrator -------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, spec: dict, threads: int):
        self.spec = spec
        python = os.path.expanduser(spec.get("python") or sys.executable)
        self.proc = subprocess.Popen([python, __file__, "--worker", json.dumps(spec), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         [str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")])})
        ready = self.proc.stdout.readline()
        if not ready:
            raise SystemExit(f"worker {spec['name']} failed to start (see its stderr above)")

    def round(self, prompt, new) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "round", "prompt": prompt, "new": new}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.spec['name']} died")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def disk_bytes(spec: dict) -> int:
    """Bytes of the model files a contestant reads: its graphs and their external data, or its GGUF file."""
    path = Path(spec["model"]).expanduser()
    if path.suffix == ".gguf":
        return path.stat().st_size
    graphs = [path] if path.is_file() else sorted(path.glob("*.onnx"))
    if path.is_dir() and (path / "genai_config.json").is_file():
        graphs = [path / "model.onnx"]
    files = set()
    for graph in graphs:
        # deferred: the orchestrator only; the workers import this file in venvs that need not have onnx
        import onnx

        files.add(graph)
        model = onnx.load(str(graph), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(graph.parent / entry.value)
    return sum(p.stat().st_size for p in files)


def gate_agreement(spec: dict) -> str:
    """What the contestant's gate is worth beside its speed: for a quantised export, the agreement of its gate with
    the float graph's on the held-out prompts, as its export measured it (``validation.weights``); the float
    exports are the reference; unsteered contestants have no gate."""
    if spec["kind"] != "ours":
        return "no gate (unsteered)"
    manifest = json.loads((Path(spec["model"]).expanduser() / "inferaligner.json").read_text())
    weights = (manifest.get("validation") or {}).get("weights")
    if (manifest.get("weights") or {}).get("format", "fp32") in ("fp32", "fp16"):
        return "reference (float graph)"
    if not weights:
        return "not measured (exported without validation)"
    shift = (manifest.get("weights") or {}).get("gate_bias")
    return (f"{weights['gates_agree']}/{weights['prompts']} held-out ({weights['missed']} harmful missed)"
            + (f", bias re-thresholded by {shift['shift']:+.3f}" if shift else ""))


def summarise(samples: list[dict], prompt_len: int) -> dict:
    ttft = statistics.median(s["ttft_s"] for s in samples)
    prefill = statistics.median(s["prefill_s"] for s in samples)
    decode = statistics.median(s["decode_steps"] / s["decode_s"] for s in samples if s["decode_s"] > 0)
    return {"ttft_ms": ttft * 1e3, "prefill_tok_s": prompt_len / prefill, "decode_tok_s": decode,
            "decode_step_ms": 1e3 / decode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--contexts", default="64,512,2048")
    parser.add_argument("--context-steps", type=int, default=16)
    parser.add_argument("--context-rounds", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated contestant names to run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker), args.threads)

    config = json.loads(Path(args.config).read_text())
    specs = [c for c in config["contestants"] if not args.only or c["name"] in args.only.split(",")]
    workers = {s["name"]: Worker(s, args.threads) for s in specs}
    prompt = prompt_ids(args.prompt)
    names = list(workers)
    for name in names:  # warm-up
        workers[name].round(prompt, 4)
    samples = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(workers[name].round(prompt, args.new))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {samples[n][-1]['decode_steps'] / samples[n][-1]['decode_s']:.1f} tok/s" for n in names),
            flush=True)
    contexts = {name: {} for name in names}
    for length in [int(c) for c in args.contexts.split(",") if c]:
        long_prompt = prompt_ids(length, seed=1)
        per = {name: [] for name in names}
        for r in range(args.context_rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                per[name].append(workers[name].round(long_prompt, args.context_steps + 1))
        for name in names:
            contexts[name][length] = summarise(per[name], length)
        print(f"context {length}: " + ", ".join(f"{n} {contexts[n][length]['decode_step_ms']:.1f} ms/step"
                                                 for n in names), flush=True)
    report = {"prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds, "threads": args.threads,
              "contestants": {}, "ratios": {}}
    for name in names:
        last = samples[name][-1]
        report["contestants"][name] = {
            **summarise(samples[name], args.prompt), "spec": workers[name].spec,
            "peak_rss_mb": max(s["peak_rss_mb"] for p in (samples[name],) for s in p),
            "disk_mb": disk_bytes(workers[name].spec) / 2 ** 20, "context_decode": contexts[name],
            "gate_agreement": gate_agreement(workers[name].spec),
            "tokens": last["tokens"][:16]}
    for a, b in config.get("ratios", []):
        if a in report["contestants"] and b in report["contestants"]:
            ca, cb = report["contestants"][a], report["contestants"][b]
            report["ratios"][f"{a} / {b}"] = {
                "decode_tok_s": ca["decode_tok_s"] / cb["decode_tok_s"],
                "prefill_tok_s": ca["prefill_tok_s"] / cb["prefill_tok_s"],
                "ttft": ca["ttft_ms"] / cb["ttft_ms"],
                "gates": [ca["gate_agreement"], cb["gate_agreement"]],
            }
    for name in names:
        cd = report["contestants"][name]["context_decode"]
        lengths = sorted(cd)
        if len(lengths) >= 2:
            report["contestants"][name]["step_growth"] = cd[lengths[-1]]["decode_step_ms"] / \
                cd[lengths[0]]["decode_step_ms"]
    for w in workers.values():
        w.close()
    print(json.dumps({k: {m: round(v, 3) if isinstance(v, float) else v for m, v in c.items()
                          if m not in ("spec", "tokens", "context_decode")}
                      for k, c in report["contestants"].items()}, indent=1))
    print(json.dumps(report["ratios"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
