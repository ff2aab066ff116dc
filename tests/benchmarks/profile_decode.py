"""Where a decode step goes (issue 20): ONNX Runtime's profile of the decode steps of steered graphs.

    .venv/bin/python tests/benchmarks/profile_decode.py profile GRAPH [GRAPH ...] [--prompt 64] [--new 32]
                                                        [--threads 2] [--out report.json]
    .venv/bin/python tests/benchmarks/profile_decode.py swap GRAPH --functions-from OTHER -o DIR

``profile``: each GRAPH (an export directory or a ``.onnx`` file) runs in its own ONNX Runtime session with the
profiler on (``SessionOptions.enable_profiling``, full graph optimisation, ``--threads`` intra-op threads), through
``aligner_runtime``'s generation loop: batch 1, the gate forced open (every SteerShift runs, every decode step feeds
``steer_gate_in = 1``), ``--prompt`` synthetic prompt tokens, ``--new`` tokens. The profile's node events are assigned
to the ``model_run`` they fall in; the first run is the prefill, the others decode steps. Per decode step (median):
the kernel calls (every node event, the nodes run inside an ``If`` branch included), those of the steering nodes
(names under ``/model/layers.{l}/steer/`` or ``/model/steer/``, and the nodes ONNX Runtime inlines from the function
form, which it names ``{op}_{n}``), the kernel time (an ``If``'s own event spans its branch's, so nested events are not
added twice) and the steering share of it.

``swap``: a copy of GRAPH's ``model.onnx`` whose model-local functions are OTHER's (same names), its external data
linked, not copied: the same weights with another export's SteerGate/SteerShift bodies. With it an export made before
issue 20 and one made after compare on identical weights (``bench_edge.py`` ``ours-plain`` contestants for speed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

STEER_MARKS = ("/steer/",)
GENERATED = re.compile(r"^[A-Za-z]+_\d+$")


def graph_path(arg: str) -> Path:
    path = Path(arg).expanduser()
    return path / "model.onnx" if path.is_dir() else path


def is_steering(name: str) -> bool:
    """A steering node's event: its name is under ``/steer/`` (inline form), or one ONNX Runtime generated,
    ``{op}_{n}`` (it leaves the nodes it inlines from a model-local function unnamed and names them so; the model's
    own nodes carry ``/model/...`` names)."""
    node = name[:-len("_kernel_time")] if name.endswith("_kernel_time") else name
    return bool(GENERATED.match(node)) or any(mark in node for mark in STEER_MARKS)


def decode_profile(events: list[dict]) -> dict:
    """Per-run figures from a profile's events (the first run is the prefill)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    per_run = []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        inside = [e for e in nodes if start <= e["ts"] <= end]
        # An If's event spans its branch's node events: count those as kernels, add their time only once.
        spans, top = [], []
        for e in inside:
            nested = any(s <= e["ts"] and e["ts"] + e["dur"] <= t for s, t in spans)
            if not nested:
                top.append(e)
            if e.get("args", {}).get("op_name") in ("If", "Loop", "Scan"):
                spans.append((e["ts"], e["ts"] + e["dur"]))
        steer = [e for e in inside if is_steering(e["name"])]
        ops: dict[str, int] = {}
        for e in steer:
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0) + 1
        per_run.append({"run_us": run["dur"], "kernels": len(inside), "steer_kernels": len(steer),
                        "kernel_us": sum(e["dur"] for e in top),
                        "steer_us": sum(e["dur"] for e in top if is_steering(e["name"])), "steer_ops": ops})
    return {"prefill": per_run[:1], "decode": per_run[1:]}


def profile(path: Path, prompt: int, new: int, threads: int) -> dict:
    # deferred: the runtime and ONNX Runtime only for the profile command
    import onnxruntime as ort

    from aligner_runtime.backends import onnxruntime as ort_backend
    from aligner_runtime.generate import GenerationRun, SamplingConfig

    prefix = Path(tempfile.mkdtemp(prefix="profile_decode_")) / "ort"

    def profiling_session(model_path, providers=None, intra_op_threads=None, inter_op_threads=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or 0
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        options.log_severity_level = 3
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])

    ort_backend.session_for = profiling_session
    backend = ort_backend.OnnxRuntimeBackend(path, intra_op_threads=threads)
    ids = np.random.default_rng(0).integers(100, 40000, size=prompt).tolist()
    steered = "steer_gate_in" in backend.input_names
    run = GenerationRun(backend, [ids], SamplingConfig(max_new_tokens=new), pad_token_id=0, two_pass=False,
                        _gate_override=1.0 if steered else None)
    for _ in run:
        pass
    profile_file = backend.session.end_profiling()
    events = json.loads(Path(profile_file).read_text())
    os.unlink(profile_file)
    runs = decode_profile(events)
    decode = runs["decode"]

    def median(key):
        return statistics.median(r[key] for r in decode) if decode else None

    kernel, steer = median("kernel_us"), median("steer_us")
    return {"graph": str(path), "decode_steps": len(decode), "kernels_per_step": median("kernels"),
            "steer_kernels_per_step": median("steer_kernels"), "run_ms": median("run_us") / 1e3,
            "kernel_ms": kernel / 1e3, "steer_ms": steer / 1e3, "steer_share": steer / kernel if kernel else None,
            "steer_ops_per_step": decode[len(decode) // 2]["steer_ops"] if decode else {},
            "prefill_kernels": runs["prefill"][0]["kernels"] if runs["prefill"] else None}


def swap(graph: Path, functions_from: Path, out: Path) -> None:
    # deferred: onnx only for the swap command
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    other = onnx.load(str(functions_from), load_external_data=False)
    theirs = {(f.domain, f.name): f for f in other.functions}
    ours = {(f.domain, f.name) for f in model.functions}
    if ours != set(theirs):
        raise SystemExit(f"the two graphs' functions differ: {sorted(ours)} vs {sorted(theirs)}")
    def imports(m):  # the domains the functions use (a quantised graph also imports com.microsoft)
        return {o.domain: o.version for o in m.opset_import if o.domain in ("", "ai.onnx", "inferaligner")}

    if imports(model) != imports(other):
        raise SystemExit("the two graphs import other opsets")
    out.mkdir(parents=True, exist_ok=False)
    for i, function in enumerate(model.functions):
        function.CopyFrom(theirs[(function.domain, function.name)])
    locations = {entry.value for init in model.graph.initializer for entry in init.external_data
                 if entry.key == "location"}
    for location in locations:
        os.symlink((graph.parent / location).resolve(), out / location)
    onnx.save(model, str(out / "model.onnx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile")
    p.add_argument("graphs", nargs="+")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    s = sub.add_parser("swap")
    s.add_argument("graph")
    s.add_argument("--functions-from", required=True)
    s.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    if args.command == "swap":
        swap(graph_path(args.graph), graph_path(args.functions_from), Path(args.output))
        return 0
    reports = []
    for graph in args.graphs:
        report = profile(graph_path(graph), args.prompt, args.new, args.threads)
        reports.append(report)
        print(f"{graph}: {report['decode_steps']} decode steps; per step {report['kernels_per_step']} kernel calls, "
              f"{report['steer_kernels_per_step']} steering; kernels {report['kernel_ms']:.2f} ms, steering "
              f"{report['steer_ms']:.2f} ms ({100 * (report['steer_share'] or 0):.1f}%); run {report['run_ms']:.2f} ms")
        print(f"  steering ops per step: {json.dumps(report['steer_ops_per_step'], sort_keys=True)}")
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
