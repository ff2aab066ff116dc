"""``make demo``: the main job on the embedded default model, end to end.

1. get SmolLM2-135M-Instruct (the target) and merge its aligned sibling's safety adapter;
2. calibrate the steering pack (shipped prompt sets, plus public sets from ../shared/data when present);
3. export the steered ONNX graph, validated against the PyTorch reference;
4. answer one harmful and one harmless prompt, unsteered and steered, with the gate;
5. evaluate on held-out prompts that calibration never saw, and print the summary table.

Everything goes under ``$INFERALIGNER_HOME/demo`` (default ``~/.cache/inferaligner-edge/demo``). A second run reuses
the pack and the export when their inputs have not changed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from aligner_runtime.errors import atomic_path, run_cli

from aligner_export import __version__

from aligner_export.hf import zoo
from aligner_export.hf.calibrate import DEFAULT_PROMPTS_DIR

SHARED_DATA = Path(os.environ.get("INFERALIGNER_SHARED_DATA", zoo.REPO_ROOT.parent / "shared" / "data"))
# How much of each public set joins the shipped calibration sets (kept small: the demo's budget is 20 minutes).
CALIBRATION_EXTRA = {"advbench": 100, "tdc_dev": 50, "self_instruct": 100, "gsm8k_head": 50}
EVAL_GSM8K_TAIL = 40  # GSM8K questions from the end of the file: never used by calibration or the sibling's training


def _banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def _lines(path: Path) -> list[str]:
    from aligner_runtime.prompts import load_prompts

    return load_prompts(path)


def _write_lines(path: Path, prompts: list[str]) -> Path:
    with atomic_path(path, suffix=".txt") as tmp:
        tmp.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n", encoding="utf-8")
    return path


def prepare_prompt_sets(work: Path) -> dict[str, Path | None]:
    """Calibration and held-out evaluation sets. Public sets join when ../shared/data is present."""
    harmful = _lines(DEFAULT_PROMPTS_DIR / "harmful.txt")
    harmless = _lines(DEFAULT_PROMPTS_DIR / "harmless.txt")
    eval_harmful = DEFAULT_PROMPTS_DIR / "harmful_heldout.txt"
    eval_harmless_prompts = _lines(DEFAULT_PROMPTS_DIR / "harmless_heldout.txt")
    templates = None
    if SHARED_DATA.is_dir():
        print(f"public prompt sets found in {SHARED_DATA}: they join calibration; HarmBench validation is the "
              f"held-out harmful set")
        adv = [r["goal"] for r in csv.DictReader((SHARED_DATA / "advbench_harmful_behaviors.csv").open())]
        tdc = json.loads((SHARED_DATA / "tdc2023_dev_behaviors.json").read_text())
        seeds = [json.loads(l)["instruction"] for l in (SHARED_DATA / "self_instruct_seed_tasks.jsonl").open()]
        gsm8k = [json.loads(l)["question"] for l in (SHARED_DATA / "gsm8k_train.jsonl").open()]
        harmful += adv[:CALIBRATION_EXTRA["advbench"]] + tdc[:CALIBRATION_EXTRA["tdc_dev"]]
        harmless += seeds[:CALIBRATION_EXTRA["self_instruct"]] + gsm8k[:CALIBRATION_EXTRA["gsm8k_head"]]
        eval_harmful = SHARED_DATA / "harmbench_val.csv"
        eval_harmless_prompts += gsm8k[-EVAL_GSM8K_TAIL:]
        templates = SHARED_DATA / "gptfuzz_jailbreak_templates.csv"
    else:
        print("no ../shared/data: calibrating on the shipped prompt sets and evaluating on the shipped held-out sets")
    return {
        "harmful": _write_lines(work / "calibration_harmful.txt", harmful),
        "harmless": _write_lines(work / "calibration_harmless.txt", harmless),
        "eval_harmful": eval_harmful,
        "eval_harmless": _write_lines(work / "eval_harmless.txt", eval_harmless_prompts),
        "templates": templates,
    }


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        p = Path(str(part))
        h.update(p.read_bytes() if p.is_file() else str(part).encode())
    return h.hexdigest()


def _cached(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == key


def _export_cli(*args) -> None:
    from aligner_export.commands.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(code)


def show_examples(export_dir: Path, prompts: list[str], max_new_tokens: int, threads: int) -> None:
    from aligner_runtime.api import Aligner
    from aligner_runtime.evaluation import UnsteeredComparison

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
    parser.add_argument("--eval-limit", type=int, default=40,
                        help="use at most N prompts of each eval set (default 40, to fit the 20-minute budget; "
                             "0 for all)")
    parser.add_argument("--max-fpr", type=float, default=0.03,
                        help="false-positive budget of the gate on harmless calibration prompts (default 0.03)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    def job() -> int:
        import torch

        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        work = Path(args.work) if args.work else zoo.home() / "demo"
        work.mkdir(parents=True, exist_ok=True)

        _banner("1/5 models")
        target, aligned = zoo.ensure_target(), zoo.ensure_aligned()
        print(f"target:  {target}\naligned: {aligned}")

        _banner("2/5 calibrate")
        sets = prepare_prompt_sets(work)
        pack = work / "smollm2.steering.safetensors"
        key = _digest(__version__, args.max_fpr, sets["harmful"], sets["harmless"],
                      aligned / "inferaligner_source.json",
                      Path(__file__).resolve().parents[1] / "hf" / "calibrate.py")
        if _cached(work / "pack.stamp", key) and pack.exists():
            print(f"reusing {pack}")
        else:
            _export_cli("calibrate", "--target", target, "--aligned", aligned, "--harmful", sets["harmful"],
                        "--harmless", sets["harmless"], "-o", pack, "--report", work / "calibration",
                        "--max-fpr", args.max_fpr, "--threads", args.threads)
            (work / "pack.stamp").write_text(key)

        _banner("3/5 export")
        export_dir = work / "smollm2-steered"
        export_key = _digest(key, pack)
        if _cached(work / "export.stamp", export_key) and (export_dir / "inferaligner.json").exists():
            print(f"reusing {export_dir}")
        else:
            if export_dir.exists():
                import shutil

                shutil.rmtree(export_dir)
            _export_cli("export", "--target", target, "--pack", pack, "-o", export_dir)
            (work / "export.stamp").write_text(export_key)

        _banner("4/5 one harmful and one harmless prompt")
        examples = [_lines(DEFAULT_PROMPTS_DIR / "harmful_heldout.txt")[0],
                    _lines(DEFAULT_PROMPTS_DIR / "harmless_heldout.txt")[0]]
        show_examples(export_dir, examples, args.max_new_tokens, args.threads)

        _banner("5/5 evaluate on held-out prompts (steered vs unsteered)")
        eval_args = ["eval", "--model", export_dir, "--harmful", sets["eval_harmful"], "--harmless",
                     sets["eval_harmless"], "--max-new-tokens", args.max_new_tokens, "--batch-size", 8,
                     "--threads", args.threads, "--report", work / "eval"]
        if sets["templates"]:
            eval_args += ["--jailbreak-templates", sets["templates"]]
        if args.eval_limit:
            eval_args += ["--limit", args.eval_limit]
        _export_cli(*eval_args)
        print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; reports under {work}")
        return 0

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
