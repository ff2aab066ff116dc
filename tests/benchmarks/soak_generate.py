"""Resident memory over many generations on one loaded export (issue 14's "flat memory" target: at most 2% growth
over 1000 generations after warm-up).

    .venv/bin/python tests/benchmarks/soak_generate.py --model EXPORT_DIR [--generations 1000] [--warmup 20]
                                                      [--new-tokens 8] [--threads 2] [--out soak.json]

Prompts alternate between the shipped held-out harmful and harmless prompts, so both gate outcomes (and the steered
second prefill) are exercised; a progress bar shows the resident set as it goes. Prints the resident set after
warm-up, its maximum and its last value, and the growth in percent; exits 1 past ``--max-growth`` (default 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "export" / "aligner_export" / "data" / "prompts"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-growth", type=float, default=2.0, help="percent")
    parser.add_argument("--out")
    args = parser.parse_args()

    from tqdm import tqdm

    from aligner_runtime import Aligner
    from aligner_runtime.prompts import load_prompts

    harmful = load_prompts(PROMPTS / "harmful_heldout.txt")
    harmless = load_prompts(PROMPTS / "harmless_heldout.txt")
    prompts = [p for pair in zip(harmful, harmless) for p in pair]
    aligner = Aligner.load(args.model, threads=args.threads)
    for i in range(args.warmup):
        aligner.generate(prompts[i % len(prompts)], max_new_tokens=args.new_tokens)
    start = rss_mb()
    samples, gates = [], 0
    with tqdm(range(args.generations), desc="generations", unit="gen") as bar:
        for i in bar:
            result = aligner.generate(prompts[i % len(prompts)], max_new_tokens=args.new_tokens)
            gates += int(result.gate > 0.5)
            if i % 10 == 9:
                samples.append(rss_mb())
                bar.set_postfix(rss_mb=f"{samples[-1]:.1f}")
    end = rss_mb()
    growth = 100.0 * (end - start) / start
    report = {"model": str(args.model), "generations": args.generations, "warmup": args.warmup,
              "new_tokens": args.new_tokens, "gates_fired": gates, "rss_mb_after_warmup": round(start, 1),
              "rss_mb_max": round(max(samples + [end]), 1), "rss_mb_end": round(end, 1),
              "growth_percent": round(growth, 2)}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
