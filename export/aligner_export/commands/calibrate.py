"""``aligner-export calibrate``: compute the steering pack (docs/architecture.md §4, §5.1, §7; docs/calibration.md).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from aligner_runtime.contract import PACK_GATES, SSV_MODES, EndRuleKey, GateKey, gate_kind
from aligner_runtime.contract.pack import LayerStatsKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError, check_count, check_writable_dir, check_writable_file, max_threads
from aligner_runtime.prompts import load_prompts, load_templates

from aligner_export import corpus
from aligner_export.gate import DEFAULT_OBJECTIVE, OBJECTIVES, POOLED_KIND, THRESHOLD_RULES
from aligner_export.hf import zoo
from aligner_export.hf.calibrate import MIN_PROMPTS, calibrate
from aligner_export.hf.families import family_for
from aligner_export.hf.modeling import check_model_dir, load_config
from aligner_export.pack import save_pack


def configure(parser) -> None:
    parser.add_argument("--target", required=True, help="HF model directory of the model to protect")
    parser.add_argument("--aligned", help="HF model directory of its safety-aligned sibling (omit: self mode)")
    parser.add_argument("--harmful", help="harmful prompt file (.txt/.json/.jsonl/.csv); with --harmless it replaces "
                                          "the shipped corpus")
    parser.add_argument("--harmless", help="harmless prompt file (with --harmful)")
    parser.add_argument("--borderline", help="harmless prompts with alarming words (with --harmful/--harmless)")
    parser.add_argument("--jailbreak-templates", help="templates holding {prompt}, to wrap harmful prompts as gate "
                                                      "positives (with --harmful/--harmless)")
    parser.add_argument("--corpus", help="a corpus directory in the shipped layout (default: the shipped corpus)")
    parser.add_argument("-o", "--output", required=True, help="steering pack to write (.safetensors)")
    parser.add_argument("--report", help="directory for calibration.png, gate.png and calibration.json")
    parser.add_argument("--gate", choices=PACK_GATES, default="linear",
                        help="linear: the multi-layer gate of docs/architecture.md §5.1 (default); paper: the paper's "
                             "one direction at one layer only; pooled: the "
                             "linear gate plus a max over every prompt token per gate layer, kept only where it "
                             "validates better than the linear gate (docs/calibration.md)")
    parser.add_argument("--max-fpr", type=float, default=0.02,
                        help="false-positive budget on generic harmless prompts (default 0.02, issue 10's target)")
    parser.add_argument("--max-fpr-borderline", type=float, default=0.10,
                        help="false-positive budget of the linear gate on borderline-benign prompts (default 0.10)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="generic",
                        help="generic (default): the threshold keeps --max-fpr on the held-out plain generic "
                             "calibration prompts, and the borderline and rewritten ones are reported; budgets: "
                             "--max-fpr (rewrites included) and --max-fpr-borderline both bind, which leaves recall "
                             "unspent (docs/calibration.md, the gate frontier study)")
    parser.add_argument("--gate-objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help="the linear gate's loss: logistic (default), the balanced logistic loss; "
                             "operating-point weighs up the prompts where the threshold sits (the top fifth of the "
                             "negatives' scores and the positives below them): better folds, but less plain recall "
                             "on the held-out sources (docs/calibration.md)")
    parser.add_argument("--wrapped", type=int, default=None,
                        help="harmful prompts wrapped in jailbreak templates as gate positives (default 80)")
    parser.add_argument("--rewrites", type=int, default=None,
                        help="rewritten prompts per rewrite family and class, for the gate (default 40)")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="share of each prompt set held out for the per-layer validation (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, wraps and rewrites")
    parser.add_argument("--batch-size", type=int, default=64, help="most prompts per forward batch (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ssv", choices=SSV_MODES, default=None,
                        help="steering vectors: response (the aligned model's own refusals minus its helpful "
                             "answers; the default with --aligned, docs/calibration.md), response-compliant (its "
                             "refusals minus the target's compliant answers to the same harmful prompts) or prompt "
                             "(the paper's prompt activations; the default in self mode)")


def _sets(args):
    wrapped = check_count(corpus.WRAPPED_DEFAULT if args.wrapped is None else args.wrapped, "--wrapped", 0, 100_000)
    rewrites = check_count(corpus.REWRITES_DEFAULT if args.rewrites is None else args.rewrites, "--rewrites", 0,
                           100_000)
    if bool(args.harmful) != bool(args.harmless):
        raise AlignerError("give --harmful and --harmless together (or neither, for the shipped corpus)")
    if args.harmful:
        if args.corpus:
            raise AlignerError("--corpus and --harmful/--harmless are alternatives")
        return corpus.file_sets(load_prompts(args.harmful, min_count=MIN_PROMPTS),
                                load_prompts(args.harmless, min_count=MIN_PROMPTS),
                                load_prompts(args.borderline) if args.borderline else [],
                                load_templates(args.jailbreak_templates) if args.jailbreak_templates else [],
                                seed=args.seed, wrapped=wrapped)
    if args.borderline or args.jailbreak_templates:
        raise AlignerError("--borderline and --jailbreak-templates go with --harmful/--harmless; the corpus has its own")
    return corpus.calibration_sets(corpus.load_corpus(args.corpus), corpus.load_templates(args.corpus), args.seed,
                                   wrapped, rewrites)


def _answer_cache(args, role: str) -> Path | None:
    """Where the ``role`` model's (aligned or target) calibration answers are kept between runs
    (``$INFERALIGNER_HOME/cache``); the file names the model's directory, and its content is checked against the
    model's fingerprint, the prompts and the token budget before it is used."""
    if args.ssv == "prompt" or not args.aligned or (role == "target" and args.ssv != "response-compliant"):
        return None
    key = hashlib.sha256(str(Path(getattr(args, role)).resolve()).encode()).hexdigest()[:16]
    return zoo.home() / "cache" / f"{role}-answers-{key}.json"


def run(args) -> int:
    out = check_writable_file(args.output, "output pack")
    if args.report:
        report = Path(args.report)
        check_writable_dir(report if report.is_dir() else report.parent, "report directory")
    check_count(args.batch_size, "--batch-size", 1, 1024)
    if args.threads is not None:
        check_count(args.threads, "--threads", 1, max_threads())
    for path in filter(None, (args.target, args.aligned)):  # an unusable model fails before any prompt is read
        check_model_dir(path)
        family_for(load_config(path))
    sets = _sets(args)

    # deferred: torch, only once the arguments, the models' directories and the prompts have been checked
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"calibration prompts: {sets.summary()}", flush=True)
    start = time.perf_counter()
    pack = calibrate(args.target, sets.harmful, sets.harmless, args.aligned, extras=sets.extras, gate=args.gate,
                     val_fraction=args.val_fraction, seed=args.seed, max_fpr=args.max_fpr,
                     max_fpr_borderline=args.max_fpr_borderline, batch_size=args.batch_size,
                     report_dir=args.report, ssv=args.ssv, response_cache=_answer_cache(args, "aligned"),
                     target_cache=_answer_cache(args, "target"),
                     threshold_rule=args.threshold_rule, objective=args.gate_objective,
                     log=lambda text: print(text, flush=True))
    save_pack(pack, out)
    rec = pack.recommended
    stats = pack.layer_stats(rec[RecommendedKey.GATE_LAYER])
    print(f"wrote {out} ({pack.mode}, {pack.num_layers} layers x {pack.hidden_size}) in "
          f"{time.perf_counter() - start:.1f}s")
    if pack.has_linear_gate:
        gate = pack.meta[PackKey.GATE]
        held = gate["heldout"]
        kind = gate_kind(gate[GateKey.VERSION]).pack_name  # linear, or pooled where the max term was kept
        print(f"{kind} gate: layers {gate['layers']}, last {gate['tokens']} tokens"
              f"{' and the max over every prompt token' if kind == POOLED_KIND else ''}"
              f"{', unit-normalised' if gate['normalize'] else ''}; leave-one-source-out TPR "
              f"{held['loso_mean_tpr']:.3f} (worst source {held['loso_min_tpr']:.3f}); held-out FPR generic "
              f"{held.get('fpr_harmless', float('nan')):.3f}, borderline {held.get('fpr_borderline', float('nan')):.3f}"
              f", rewritten {held.get('fpr_rewritten', float('nan')):.3f} (threshold rule: "
              f"{gate.get('threshold_rule', 'budgets')}, objective: {gate.get('objective', 'logistic')})")
    print(f"paper gate: layer {rec[RecommendedKey.GATE_LAYER]} (validation accuracy "
          f"{stats[LayerStatsKey.TARGET_VAL_ACCURACY]:.3f}, TPR {stats[LayerStatsKey.VAL_TPR]:.3f}, FPR "
          f"{stats[LayerStatsKey.VAL_FPR]:.3f} with the fpr bias)")
    steer, end_rule = rec[RecommendedKey.STEER_LAYERS], rec.get(RecommendedKey.END_RULE)
    print(f"recommended: {rec.get(RecommendedKey.GATE, 'paper')} gate, {rec.get(RecommendedKey.SSV, 'prompt')} "
          f"vectors on layers {steer[0]}-{steer[-1]}, alpha {rec[RecommendedKey.ALPHA]}"
          + (f", end rule after {end_rule[EndRuleKey.AFTER]} tokens (+{end_rule[EndRuleKey.SLOPE]:g}/token)"
             if end_rule else ""))
    info = pack.meta.get("ssv", {})
    if info.get("ssv") == "response":
        print(f"response vectors: the aligned model refused {info['refused']}/{info['harmful']} harmful and answered "
              f"{info['answered']}/{info['harmless']} harmless calibration prompts; {info['refusals_ended']} "
              f"refusals ended within {info['max_new_tokens']} tokens")
    elif info.get("ssv") == "response-compliant":
        print(f"response-compliant vectors: of {info['harmful']} harmful calibration prompts the aligned model "
              f"refused {info['refused']} ({info['refusals_ended']} ended within {info['max_new_tokens']} tokens) "
              f"and the target complied with {info['complied']} ({info['paired']} both)")
    if args.report:
        print(f"report: {Path(args.report) / 'calibration.png'}")
    return 0
