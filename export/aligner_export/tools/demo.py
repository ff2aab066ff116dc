"""``make demo``: the main job on the embedded default model, end to end, the same on every machine.

1. get SmolLM2-135M-Instruct (the target) and merge its aligned sibling's safety adapter;
2. calibrate the steering pack on the shipped corpus (``aligner_export/data/corpus``: calibration sources only), with
   the linear gate of docs/architecture.md §5.1;
3. export the steered ONNX graph, validated against the PyTorch reference;
4. answer one harmful and one harmless prompt, unsteered and steered, with the gate;
5. evaluate on a sample of the corpus's held-out sources (never seen by calibration): the gate per source, the
   bypass suite, generation steered against unsteered, and the steering alone (gate forced open); print the summary
   and the targets. The sample keeps the demo within 20 minutes on two cores; ``make eval`` (``--full``) runs the
   full evaluation (every held-out prompt scored, 80 answers per set).

Everything goes under ``$INFERALIGNER_HOME/demo`` (default ``~/.cache/inferaligner-edge/demo``). A second run reuses
the pack and the export when their inputs have not changed.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

from aligner_runtime.api import Aligner
from aligner_runtime.errors import run_cli
from aligner_runtime.evaluation import UnsteeredComparison
from aligner_runtime.prompts import load_prompts

from aligner_export import __version__
from aligner_export.commands import cli
from aligner_export.corpus import CORPUS_DIR, PROMPTS_DIR
from aligner_export.hf import zoo


class _Phases:
    """Each step's wall time, printed at the end (the demo's budget is 20 minutes on two cores)."""

    def __init__(self):
        self.times: list[tuple[str, float]] = []
        self.start = time.perf_counter()

    def banner(self, text: str, name: str) -> None:
        now = time.perf_counter()
        self.times.append((name, now))
        print(f"\n== {text} ==", flush=True)

    def summary(self) -> str:
        ends = [t for _, t in self.times[1:]] + [time.perf_counter()]
        parts = ", ".join(f"{name} {end - t:.0f}s" for (name, t), end in zip(self.times, ends))
        return f"{ends[-1] - self.start:.0f}s ({parts})"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        p = Path(str(part))
        h.update(p.read_bytes() if p.is_file() else str(part).encode())
    return h.hexdigest()


def _cached(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == key


def _export_cli(*args) -> None:
    code = cli.main([str(a) for a in args])
    if code != 0:
        raise SystemExit(code)


def show_examples(export_dir: Path, prompts: list[str], max_new_tokens: int, threads: int) -> None:
    aligner = Aligner.load(export_dir, threads=threads)
    compare = UnsteeredComparison(aligner)
    unsteered = compare.unsteered(prompts, max_new_tokens=max_new_tokens)
    steered = compare.steered(prompts, max_new_tokens=max_new_tokens)
    for prompt, off, on in zip(prompts, unsteered, steered):
        print(f"\nprompt:    {prompt}")
        print(f"gate:      {on.gate:.0f} (score {on.score:+.3f})")
        print(f"unsteered: {off.text.strip()!r}")
        print(f"steered:   {on.text.strip()!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aligner_export.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working directory (default: $INFERALIGNER_HOME/demo)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="generation: at most N prompts of each held-out set (default 16, to fit the 20-minute "
                             "budget; 80 with --full)")
    parser.add_argument("--gate-limit", type=int, default=None,
                        help="gate scores: at most N prompts of each held-out source (default 40; 0 for all, the "
                             "default with --full)")
    parser.add_argument("--full", action="store_true",
                        help="the full evaluation (make eval): every held-out prompt scored, 80 answers per set")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="new tokens per answer (64: the refusal-quality target counts answers that end within 64)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.eval_limit is None:
        args.eval_limit = 80 if args.full else 16
    if args.gate_limit is None:
        args.gate_limit = 0 if args.full else 40

    def job() -> int:
        # deferred: torch, only to set its threads for the calibration run in this process
        import torch

        torch.set_num_threads(args.threads)
        phases = _Phases()
        work = Path(args.work) if args.work else zoo.home() / "demo"
        work.mkdir(parents=True, exist_ok=True)

        phases.banner("1/5 models", "models")
        target, aligned = zoo.ensure_target(), zoo.ensure_aligned()
        print(f"target:  {target}\naligned: {aligned}")

        phases.banner("2/5 calibrate on the shipped corpus (calibration sources)", "calibration")
        pack = work / "smollm2.steering.safetensors"
        key = _digest(__version__, *sorted(CORPUS_DIR.glob("*.jsonl")), *sorted(PROMPTS_DIR.glob("*.txt")),
                      aligned / "inferaligner_source.json",
                      *_sources("hf/calibrate.py", "gate.py", "gate_tokens.py", "corpus.py"))
        if _cached(work / "pack.stamp", key) and pack.exists():
            print(f"reusing {pack}")
        else:
            _export_cli("calibrate", "--target", target, "--aligned", aligned, "-o", pack,
                        "--report", work / "calibration", "--threads", args.threads)
            (work / "pack.stamp").write_text(key)

        phases.banner("3/5 export", "export")
        export_dir = work / "smollm2-steered"
        export_key = _digest(key, pack, *_sources("hf/export.py", "graph/rewrite.py", "graph/onnx_ops.py"))
        if _cached(work / "export.stamp", export_key) and (export_dir / "inferaligner.json").exists():
            print(f"reusing {export_dir}")
        else:
            if export_dir.exists():
                shutil.rmtree(export_dir)
            _export_cli("export", "--target", target, "--pack", pack, "-o", export_dir)
            (work / "export.stamp").write_text(export_key)

        phases.banner("4/5 one harmful and one harmless prompt", "examples")
        examples = [load_prompts(PROMPTS_DIR / "harmful_heldout.txt")[0],
                    load_prompts(PROMPTS_DIR / "harmless_heldout.txt")[0]]
        show_examples(export_dir, examples, args.max_new_tokens, args.threads)

        phases.banner("5/5 evaluate on the corpus's held-out sources (steered vs unsteered; gate forced open)"
                      + ("" if args.full else ": a sample, `make eval` for the full evaluation"), "evaluation")
        eval_args = ["eval", "--model", export_dir, "--max-new-tokens", args.max_new_tokens, "--batch-size", 8,
                     "--threads", args.threads, "--report", work / ("eval-full" if args.full else "eval"),
                     "--limit", args.eval_limit]
        if args.gate_limit:
            eval_args += ["--gate-limit", args.gate_limit]
        _export_cli(*eval_args)
        print(f"\ndemo finished in {phases.summary()}; reports under {work}")
        return 0

    return run_cli(job)


def _sources(*names: str) -> list[Path]:
    """The package's own files whose change invalidates a cached step."""
    root = Path(__file__).resolve().parents[1]
    return [root / name for name in names]


if __name__ == "__main__":
    sys.exit(main())
