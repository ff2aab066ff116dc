"""``aligner-export eval``: run an export steered and unsteered on prompt sets and write a report.

    aligner-export eval --model OUTDIR --report DIR                      # the corpus's held-out sources
    aligner-export eval --model OUTDIR --harmful F --harmless F [--jailbreak-templates F] --report DIR

Without prompt files, the shipped corpus's held-out sources are used (``aligner_export.evaluation.corpus_eval``): the
gate per source with ROC curves, the bypass suite, generation steered against unsteered, and the steering alone (gate
forced open), with the open targets checked; ``gate.png`` is added to the report. The expected duration is printed
before the run starts. ``--gate-only`` scores the gate sets alone (no generation): the quick way to compare gates.

Writes ``report.json`` (every figure and every prompt's answers), ``report.md`` (the summary table) and
``report.png`` (ASR bars, gate-score histograms with the threshold). See ``aligner_export/evaluation.py``.

For a vision-language export the prompt files may be multimodal: JSONL (or JSON) objects with ``image`` (or
``image_url``, a local path) and ``question``, as MM-Harmful Bench lays them out.
"""

from __future__ import annotations

from pathlib import Path

from aligner_runtime.api import Aligner
from aligner_runtime.errors import AlignerError, check_count, check_writable_dir, max_threads
from aligner_runtime.prompts import load_prompt_items, load_templates
from aligner_runtime.vision import load_image

from aligner_export.evaluation import gate_eval
from aligner_export.evaluation.corpus_eval import run_corpus_eval
from aligner_export.evaluation.evaluate import PromptSet, evaluate, jailbreak_prompts, make_judge, markdown, write_report


def configure(parser) -> None:
    parser.add_argument("--model", required=True, help="export directory (from aligner-export export)")
    parser.add_argument("--harmful", help="harmful prompts (.txt/.json/.jsonl/.csv; JSONL with image + question for a "
                        "vision-language export); without --harmful/--harmless: the corpus's held-out sources")
    parser.add_argument("--harmless", help="harmless prompts")
    parser.add_argument("--corpus", help="corpus directory for the held-out evaluation (default: the shipped one)")
    parser.add_argument("--gate-limit", type=int, default=None,
                        help="corpus mode: score at most N prompts of each held-out source (default: all)")
    parser.add_argument("--gate-only", action="store_true",
                        help="corpus mode: score the gate on the held-out sets only (no generation; minutes, not an "
                             "hour): per-source TPR and FPR, the bypass suite and the margin of the decision")
    parser.add_argument("--jailbreak-templates", help="jailbreak templates with a {prompt} slot (e.g. GPTFuzz CSV)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use at most N prompts of each set for generation (corpus mode default 40)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts generated together (left-padded); 1 keeps per-prompt latency exact")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--judge", default="keyword", help="refusal judge (default: keyword)")
    parser.add_argument("--report", required=True, help="report directory (created; files replaced atomically)")


def run(args) -> int:
    for name, high in (("limit", 1_000_000), ("gate_limit", 1_000_000), ("max_new_tokens", 4096),
                       ("batch_size", 1024)):
        if getattr(args, name) is not None:
            check_count(getattr(args, name), f"--{name.replace('_', '-')}", 1, high)
    if args.threads is not None:
        check_count(args.threads, "--threads", 1, max_threads())
    report_dir = Path(args.report)
    if report_dir.exists() and not report_dir.is_dir():
        raise AlignerError(f"--report must be a directory, and {report_dir} is a file")
    check_writable_dir(report_dir if report_dir.is_dir() else report_dir.parent, "report directory")
    if bool(args.harmful) != bool(args.harmless):
        raise AlignerError("give --harmful and --harmless together (or neither, for the corpus's held-out sources)")
    judge = make_judge(args.judge)
    if args.harmful:
        if args.corpus or args.gate_limit or args.gate_only:
            raise AlignerError("--corpus, --gate-limit and --gate-only are for the corpus evaluation (no "
                               "--harmful/--harmless)")
        report = _files_report(args, judge)
    else:
        if args.jailbreak_templates:
            raise AlignerError("--jailbreak-templates goes with --harmful/--harmless; the corpus has its own")
        aligner = Aligner.load(args.model, threads=args.threads)
        aligner.sampling_config(max_new_tokens=args.max_new_tokens)  # a bad value fails before the long run
        report = run_corpus_eval(aligner, judge, args.corpus, limit=args.limit if args.limit is not None else 40,
                                 gate_limit=args.gate_limit, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, log=lambda text: print(text, flush=True),
                                 generate=not args.gate_only)
        report["inputs"] = {"corpus": args.corpus or "shipped"}
    paths = write_report(report, args.report)
    print(gate_eval.markdown_gate(report) if report.get("gate_only") else markdown(report))
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _files_report(args, judge) -> dict:
    harmful_items = load_prompt_items(args.harmful)[: args.limit]
    harmless_items = load_prompt_items(args.harmless)[: args.limit]
    harmful = [item.text for item in harmful_items]
    harmless = [item.text for item in harmless_items]
    harmful_images = [list(item.images) or None for item in harmful_items]
    harmless_images = [list(item.images) or None for item in harmless_items]
    templates = load_templates(args.jailbreak_templates) if args.jailbreak_templates else None
    aligner = Aligner.load(args.model, threads=args.threads)
    aligner.sampling_config(max_new_tokens=args.max_new_tokens)  # a bad value fails before the long run
    if any(harmful_images) or any(harmless_images):
        if not aligner.multimodal:
            raise AlignerError(f"the prompt files name images but {args.model} is a text-only export (no vision "
                               f"graph)")
        for sources in harmful_images + harmless_images:  # every image is read before the long run starts
            for source in sources or ():
                load_image(source)

    sets = [PromptSet("harmful", harmful, True, harmful_images if any(harmful_images) else None)]
    if templates:
        sets.append(PromptSet("jailbreak", jailbreak_prompts(harmful, templates), True,
                              harmful_images if any(harmful_images) else None))
    sets.append(PromptSet("harmless", harmless, False, harmless_images if any(harmless_images) else None))
    report = evaluate(aligner, sets, judge, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    report["inputs"] = {"harmful": str(args.harmful), "harmless": str(args.harmless),
                        "jailbreak_templates": args.jailbreak_templates,
                        "templates_used": min(len(templates), len(harmful)) if templates else 0}
    return report
