"""``aligner-export calibrate``: compute the steering pack (ARCHITECTURE.md §4, §7)."""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_HARMFUL = "harmful.txt"
DEFAULT_HARMLESS = "harmless.txt"


def configure(parser) -> None:
    parser.add_argument("--target", required=True, help="HF model directory of the model to protect")
    parser.add_argument("--aligned", help="HF model directory of its safety-aligned sibling (omit: self mode)")
    parser.add_argument("--harmful", help="harmful prompt file (.txt/.json/.jsonl/.csv); default: the shipped set")
    parser.add_argument("--harmless", help="harmless prompt file; default: the shipped set")
    parser.add_argument("-o", "--output", required=True, help="steering pack to write (.safetensors)")
    parser.add_argument("--report", help="directory for calibration.png and calibration.json")
    parser.add_argument("--max-fpr", type=float, default=0.01,
                        help="false-positive budget on harmless calibration prompts for the 'fpr' bias (default 0.01)")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="share of each prompt set held out for validation (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration/validation split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    from aligner_runtime.errors import AlignerError
    from aligner_runtime.prompts import load_prompts

    from aligner_export.hf.calibrate import DEFAULT_PROMPTS_DIR, MIN_PROMPTS

    out = Path(args.output)
    if not out.parent.is_dir():
        raise AlignerError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise AlignerError(f"output path is a directory: {out}")
    harmful = load_prompts(args.harmful or DEFAULT_PROMPTS_DIR / DEFAULT_HARMFUL, min_count=MIN_PROMPTS)
    harmless = load_prompts(args.harmless or DEFAULT_PROMPTS_DIR / DEFAULT_HARMLESS, min_count=MIN_PROMPTS)

    import torch

    from aligner_export.hf.calibrate import calibrate
    from aligner_export.pack import save_pack

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pack = calibrate(args.target, harmful, harmless, args.aligned, val_fraction=args.val_fraction, seed=args.seed,
                     max_fpr=args.max_fpr, batch_size=args.batch_size, report_dir=args.report)
    save_pack(pack, out)
    rec = pack.recommended
    stats = pack.layer_stats(rec["gate_layer"])
    print(f"wrote {out} ({pack.mode}, {pack.num_layers} layers x {pack.hidden_size}) in "
          f"{time.perf_counter() - start:.1f}s")
    print(f"recommended: gate layer {rec['gate_layer']} (validation accuracy {stats['target_val_accuracy']:.3f}, "
          f"TPR {stats['val_tpr']:.3f}, FPR {stats['val_fpr']:.3f} with the fpr bias), steered layers "
          f"{rec['steer_layers'][0]}-{rec['steer_layers'][-1]}, alpha {rec['alpha']}")
    if args.report:
        print(f"report: {Path(args.report) / 'calibration.png'}")
    return 0
