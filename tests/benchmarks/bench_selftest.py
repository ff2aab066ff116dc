"""Cost of the load-time checks of issue 21 on a real export: the signature check, the steering self-test's constants
floors and its canary prefill (docs/integrity.md "The steering self-test"; target: at most 0.5 s on SmolLM2).

    .venv/bin/python tests/benchmarks/bench_selftest.py --export DIR [--rounds 7] [--threads N] [--out report.json]

DIR is a steered export, e.g. of the embedded SmolLM2-135M-Instruct (the README's quick start: ``aligner-export
calibrate --target $T --aligned $A -o smollm2.pack.safetensors`` then ``aligner-export export --target $T --pack
smollm2.pack.safetensors -o DIR``; `make demo` makes one too). The export is loaded once (its own self-test skipped,
so the figures below are the only runs), then, interleaved round by round:

- ``signature``: ``signing.check_export`` with a fresh key pair (the export is signed into a temporary copy of its
  manifest and signature only: the check reads nothing else);
- ``constants``: ``selftest.check_constants`` over the graph summary;
- ``canaries``: ``selftest.run_canaries`` as ``Aligner.load`` runs it (the shared template opening prefilled once),
  and ``canaries_whole``, the same canaries with every prompt prefilled whole (the previous way, for comparison).

Prints the median and the range of each, the canary report, and the machine's load average (the cores are shared on
a development machine: compare figures taken together only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, type=Path, help="a steered export directory")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not (args.export / "inferaligner.json").is_file():
        print(f"bench_selftest: not an export directory: {args.export}", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 1000:
        print("bench_selftest: --rounds must be in 1..1000", file=sys.stderr)
        return 2

    from aligner_runtime import selftest, signing
    from aligner_runtime.api import Aligner
    from aligner_runtime.manifest import manifest_sha256

    start = time.perf_counter()
    aligner = Aligner.load(args.export, self_test="no-canary-gate", threads=args.threads)
    load_seconds = time.perf_counter() - start
    facts = selftest.steering_facts(aligner.export.graph)
    tokens = max(g["tokens"] for g in facts.gates.values())
    digest = manifest_sha256(args.export)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        signed = tmp / "export"
        signed.mkdir()
        shutil.copy(args.export / "inferaligner.json", signed / "inferaligner.json")
        _, public, _ = signing.keygen(tmp / "bench.key")
        signing.sign_export(signed, tmp / "bench.key")
        keys = signing.trusted_keys([public])

        times: dict[str, list[float]] = {"signature": [], "constants": [], "canaries": [], "canaries_whole": []}
        report = whole = None
        for _ in range(args.rounds):
            t = time.perf_counter()
            assert signing.check_export(signed, digest, trusted_keys=keys).state == "verified"
            times["signature"].append(time.perf_counter() - t)
            t = time.perf_counter()
            selftest.check_constants(aligner.export.graph, str(args.export))
            times["constants"].append(time.perf_counter() - t)
            report = selftest.run_canaries(aligner, True, facts.bias, gate_tokens=tokens)
            times["canaries"].append(report.seconds)
            whole = selftest.run_canaries(aligner, True, facts.bias, gate_tokens=None)
            times["canaries_whole"].append(whole.seconds)

    result = {"export": str(args.export), "rounds": args.rounds, "threads": args.threads,
              "load_seconds_without_self_test": load_seconds, "loadavg": os.getloadavg(),
              "median_seconds": {k: statistics.median(v) for k, v in times.items()},
              "range_seconds": {k: [min(v), max(v)] for k, v in times.items()},
              "report": {"harmful_gates": report.harmful_gates, "harmless_gates": report.harmless_gates,
                         "logit_shifts": report.logit_shifts, "projections": report.projections,
                         "threshold": report.threshold, "problems": report.problems()},
              "report_whole": {"logit_shifts": whole.logit_shifts, "projections": whole.projections}}
    for name, values in times.items():
        print(f"{name:15s} median {statistics.median(values) * 1000:8.1f} ms   range {min(values) * 1000:.1f}–"
              f"{max(values) * 1000:.1f} ms")
    total = sum(result["median_seconds"][k] for k in ("signature", "constants", "canaries"))
    print(f"{'self-test total':15s} median {total * 1000:8.1f} ms (signature + constants + canaries; target 500 ms)")
    print(f"canary report: {json.dumps(result['report'])}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in result['loadavg'])}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
