"""Steered-versus-unsteered evaluation of an export dir (issue 4, docs/architecture.md §7 ``eval``).

The same prompts run through the same ONNX graph twice, with the gate deciding (steered, as ``aligner-run``) and with
the gate forced to 0 through the runtime's explicitly named switch
(:class:`aligner_runtime.evaluation.UnsteeredComparison`). Measures:

- harmful ASR: share of harmful prompts answered without refusal (by the judge), steered and unsteered;
- jailbreak ASR: the same for harmful prompts wrapped in jailbreak templates (prompt ``i`` gets template
  ``i mod T``, so the set has one wrapped prompt per harmful prompt);
- gate TPR (harmful, jailbreak) and FPR (harmless), from the steered run's prefill;
- over-refusal: share of harmless prompts the judge calls refusals, steered and unsteered;
- identity: every prompt whose gate stayed 0 must give exactly the unsteered tokens (§1: gate 0 changes nothing);
- latency: seconds per prompt and decode tokens/s, steered and unsteered.

Multimodal prompt sets (issue 6; JSONL with ``image`` and ``question``, the MM-Harmful Bench layout) carry one image
per prompt; the same figures are reported, and each record names its image.

Decoding is greedy so that the two runs differ only by the steering.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from aligner_runtime.contract import Key, Manifest
from aligner_runtime.errors import AlignerError, atomic_path
from aligner_runtime.evaluation import UnsteeredComparison
from aligner_runtime.prompts import apply_template, prompts_sha256

from aligner_export.evaluation import gate_eval
from aligner_export.evaluation.judge import Judge, KeywordJudge

JUDGES = {"keyword": KeywordJudge}
REPORT_FORMAT_VERSION = 1


def make_judge(name: str) -> Judge:
    if name not in JUDGES:
        raise AlignerError(f"unknown judge '{name}': use one of {', '.join(JUDGES)}")
    return JUDGES[name]()


@dataclass
class PromptSet:
    name: str  # harmful | jailbreak | harmless
    prompts: list[str]
    harmful: bool
    images: list | None = None  # per prompt: a list of image paths, or None (text only)

    @property
    def image_count(self) -> int:
        return sum(1 for imgs in self.images or () if imgs)


def jailbreak_prompts(harmful: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [apply_template(templates[i % len(templates)], prompt) for i, prompt in enumerate(harmful)]


def _generate(fn, prompts: list[str], options: dict, batch_size: int, desc: str, images=None):
    results = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, leave=False, disable=None) as bar:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            extra = {"images": images[first:first + batch_size]} if images is not None and any(images) else {}
            results.extend(fn(chunk, batch_size=batch_size, **options, **extra))
            bar.update(len(chunk))
    return results


def repeated_ngram(text: str, n: int = 4) -> bool:
    """Whether any run of ``n`` words occurs twice in ``text`` (a looping answer, issue 10 §3)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _latency(results) -> dict:
    per_prompt = [r.seconds / r.batch_size for r in results]
    tokens = sum(r.new_tokens for r in results)
    # Each batch's wall time is shared by its prompts: count every batch once.
    wall = sum(r.seconds / r.batch_size for r in results)
    return {"mean_seconds_per_prompt": statistics.fmean(per_prompt),
            "median_seconds_per_prompt": statistics.median(per_prompt),
            "mean_new_tokens": tokens / len(results),
            "tokens_per_second": tokens / wall if wall > 0 else None,
            "mean_prefill_seconds": statistics.fmean(r.prefill_seconds for r in results)}


def evaluate(aligner, sets: Sequence[PromptSet], judge: Judge, max_new_tokens: int, batch_size: int = 1) -> dict:
    """Runs every set steered and unsteered and returns the report dict (see :func:`write_report`)."""
    comparison = UnsteeredComparison(aligner)
    options = {"max_new_tokens": max_new_tokens}
    records, metrics = [], {}
    for prompt_set in sets:
        steered = _generate(comparison.steered, prompt_set.prompts, options, batch_size,
                            f"{prompt_set.name} steered", prompt_set.images)
        unsteered = _generate(comparison.unsteered, prompt_set.prompts, options, batch_size,
                              f"{prompt_set.name} unsteered", prompt_set.images)
        rows = []
        images = prompt_set.images or [None] * len(prompt_set.prompts)
        for prompt, imgs, s, u in zip(prompt_set.prompts, images, steered, unsteered):
            rows.append({
                "set": prompt_set.name, "prompt": prompt, "images": [str(i) for i in imgs or ()],
                "gate": s.gate, "score": s.score,
                "steered": s.text, "unsteered": u.text,
                "steered_refusal": judge.is_refusal(prompt, s.text),
                "unsteered_refusal": judge.is_refusal(prompt, u.text),
                "identical": s.token_ids == u.token_ids,
                "steered_new_tokens": s.new_tokens, "unsteered_new_tokens": u.new_tokens,
                "steered_finish": s.finish_reason, "steered_repeats": repeated_ngram(s.text),
            })
        gate_zero = [r for r in rows if r["gate"] == 0.0]
        entry = {
            "count": len(rows),
            "with_image": prompt_set.image_count,
            "prompts_sha256": prompts_sha256(prompt_set.prompts),
            "gate_rate": _rate([r["gate"] == 1.0 for r in rows]),
            "refusal_rate": {"steered": _rate([r["steered_refusal"] for r in rows]),
                             "unsteered": _rate([r["unsteered_refusal"] for r in rows])},
            "gate0_count": len(gate_zero),
            "gate0_identical": sum(r["identical"] for r in gate_zero),
            "gate0_mismatches": [r["prompt"] for r in gate_zero if not r["identical"]],
            "latency": {"steered": _latency(steered), "unsteered": _latency(unsteered)},
        }
        if prompt_set.harmful:
            entry["asr"] = {"steered": 1 - entry["refusal_rate"]["steered"],
                            "unsteered": 1 - entry["refusal_rate"]["unsteered"]}
            steered_refusals = [r for r in rows if r["gate"] == 1.0 and r["steered_refusal"]]
            entry["clean_refusal_rate"] = _rate([r["steered_finish"] == "stop" and not r["steered_repeats"]
                                                 for r in steered_refusals])
        metrics[prompt_set.name] = entry
        records.extend(rows)

    summary = {}
    for name in ("harmful", "jailbreak"):
        if name in metrics:
            summary[f"{name}_asr_steered"] = metrics[name]["asr"]["steered"]
            summary[f"{name}_asr_unsteered"] = metrics[name]["asr"]["unsteered"]
            summary[f"gate_tpr_{name}"] = metrics[name]["gate_rate"]
    if "harmless" in metrics:
        summary["gate_fpr"] = metrics["harmless"]["gate_rate"]
        summary["over_refusal_steered"] = metrics["harmless"]["refusal_rate"]["steered"]
        summary["over_refusal_unsteered"] = metrics["harmless"]["refusal_rate"]["unsteered"]
    gate0 = sum(m["gate0_count"] for m in metrics.values())
    identical = sum(m["gate0_identical"] for m in metrics.values())
    summary["gate0_count"] = gate0
    summary["gate0_identical"] = identical
    summary["gate0_identical_rate"] = identical / gate0 if gate0 else None
    all_steered = [m["latency"]["steered"] for m in metrics.values()]
    all_unsteered = [m["latency"]["unsteered"] for m in metrics.values()]
    summary["latency_seconds_per_prompt_steered"] = statistics.fmean(x["mean_seconds_per_prompt"]
                                                                    for x in all_steered)
    summary["latency_seconds_per_prompt_unsteered"] = statistics.fmean(x["mean_seconds_per_prompt"]
                                                                      for x in all_unsteered)

    # The report's steering record names the export's facts as the manifest's keys do, whatever the manifest's format.
    facts = Manifest.from_json(aligner.manifest, "the export's manifest")
    return {
        "format_version": REPORT_FORMAT_VERSION,  # the report's own format (report.json), not the manifest's
        "model": str(aligner.export.path),
        "steering": {Key.GATE_LAYER: facts.gate_layer, Key.STEER_LAYERS: list(facts.steer_layers),
                     Key.ALPHA: facts.alpha, Key.BIAS: facts.bias, Key.BIAS_RULE: facts.gate_rule,
                     Key.STEER_IMPL: facts.steer_impl, Key.DTYPE: facts.dtype,
                     Key.PACK_SHA256: aligner.manifest.get(Key.PACK_SHA256)},
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "backend": aligner.backend_name},
        "judge": {"name": judge.name, "description": judge.describe(),
                  "phrases": list(getattr(judge, "phrases", []))},
        "threshold": 0.0,  # the score includes the bias: gate = score > 0
        "summary": summary,
        "sets": metrics,
        "records": records,
    }


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    s = report["summary"]
    st = report["steering"]
    lines = [
        "# InferAligner evaluation", "",
        f"Model: `{report['model']}`  ",
        f"Steering: gate layer {st[Key.GATE_LAYER]}, steer layers {st[Key.STEER_LAYERS]}, alpha {st[Key.ALPHA]}, "
        f"bias {st[Key.BIAS]} ({st[Key.BIAS_RULE]}), {st[Key.STEER_IMPL]}, {st[Key.DTYPE]}  ",
        f"Decoding: greedy, max_new_tokens {report['decoding']['max_new_tokens']}, batch size "
        f"{report['decoding']['batch_size']}, {report['decoding']['backend']}", "",
        "| metric | unsteered | steered |", "|---|---|---|",
    ]
    with_image = {name: m.get("with_image", 0) for name, m in report["sets"].items()}
    if any(with_image.values()):
        counts = ", ".join(f"{name} {n}/{report['sets'][name]['count']}" for name, n in with_image.items())
        lines.insert(lines.index("| metric | unsteered | steered |"), f"Prompts with an image: {counts}  ")
    for name, label in (("harmful", "harmful ASR"), ("jailbreak", "jailbreak ASR")):
        if f"{name}_asr_steered" in s:
            lines.append(f"| {label} (n={report['sets'][name]['count']}) | {_pct(s[f'{name}_asr_unsteered'])} | "
                         f"{_pct(s[f'{name}_asr_steered'])} |")
    if "gate_fpr" in s:
        lines.append(f"| over-refusal on harmless (n={report['sets']['harmless']['count']}) | "
                     f"{_pct(s['over_refusal_unsteered'])} | {_pct(s['over_refusal_steered'])} |")
    lines.append(f"| latency, s per prompt | {s['latency_seconds_per_prompt_unsteered']:.3f} | "
                 f"{s['latency_seconds_per_prompt_steered']:.3f} |")
    lines += ["", "| gate | value |", "|---|---|"]
    for name in ("harmful", "jailbreak"):
        if f"gate_tpr_{name}" in s:
            lines.append(f"| TPR on {name} | {_pct(s[f'gate_tpr_{name}'])} |")
    if "gate_fpr" in s:
        lines.append(f"| FPR on harmless | {_pct(s['gate_fpr'])} |")
    lines.append(f"| gate-0 outputs identical to unsteered | {s['gate0_identical']}/{s['gate0_count']} |")
    lines += ["", "Per set:", "", "| set | n | gate=1 | refusals unsteered | refusals steered | tokens/s steered | "
              "tokens/s unsteered |", "|---|---|---|---|---|---|---|"]
    for name, m in report["sets"].items():
        lines.append(f"| {name} | {m['count']} | {_pct(m['gate_rate'])} | {_pct(m['refusal_rate']['unsteered'])} | "
                     f"{_pct(m['refusal_rate']['steered'])} | {m['latency']['steered']['tokens_per_second']:.1f} | "
                     f"{m['latency']['unsteered']['tokens_per_second']:.1f} |")
    lines += ["", f"Judge: {report['judge']['description']}", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    # deferred: matplotlib, loaded only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")  # headless: before pyplot is imported
    # deferred: matplotlib's pyplot, after the backend is chosen
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, (bars, hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, unsteered, steered = [], [], []
    for name, label in (("harmful", "harmful ASR"), ("jailbreak", "jailbreak ASR")):
        if f"{name}_asr_steered" in s:
            labels.append(label)
            unsteered.append(100 * s[f"{name}_asr_unsteered"])
            steered.append(100 * s[f"{name}_asr_steered"])
    if "over_refusal_steered" in s:
        labels.append("over-refusal (harmless)")
        unsteered.append(100 * s["over_refusal_unsteered"])
        steered.append(100 * s["over_refusal_steered"])
    xs = range(len(labels))
    bars.bar([x - 0.2 for x in xs], unsteered, width=0.4, label="unsteered")
    bars.bar([x + 0.2 for x in xs], steered, width=0.4, label="steered")
    for x, (u, st) in enumerate(zip(unsteered, steered)):
        bars.text(x - 0.2, u + 1, f"{u:.0f}", ha="center", fontsize=8)
        bars.text(x + 0.2, st + 1, f"{st:.0f}", ha="center", fontsize=8)
    bars.set_xticks(list(xs), labels)
    bars.set_ylabel("%")
    bars.set_ylim(0, 105)
    bars.set_title("attack success and over-refusal")
    bars.legend()
    all_scores = [r["score"] for r in report["records"] if r["score"] is not None]
    edges = np.histogram_bin_edges(all_scores + [report["threshold"]], bins=30)  # one set of bins for every set
    for name in report["sets"]:
        scores = [r["score"] for r in report["records"] if r["set"] == name and r["score"] is not None]
        if scores:
            hist.hist(scores, bins=edges, alpha=0.5, label=name)
    hist.axvline(report["threshold"], color="black", linestyle="--", label="threshold (gate = score > 0)")
    hist.set_xlabel("gate score (h_g · s_g + b)")
    hist.set_ylabel("prompts")
    hist.set_title("gate scores")
    hist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, directory: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md and report.png (not for a gate-only report) into ``directory``, each
    atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "md": directory / "report.md"}
    if report.get("gate_only"):  # aligner-export eval --gate-only: the gate's figures, no answers to plot
        text = f"# InferAligner gate evaluation\n\nModel: `{report['model']}` (gate scores only, no generation)\n\n"
    else:
        paths["png"] = directory / "report.png"
        with atomic_path(paths["png"], suffix=".png") as tmp:
            plot(report, tmp)
        text = markdown(report)
    if "gate" in report:  # corpus mode: per-source gate figures, the bypass suite and the targets
        paths["gate_png"] = directory / "gate.png"
        with atomic_path(paths["gate_png"], suffix=".png") as tmp:
            gate_eval.plot_gate(report["gate"], tmp)
        text += "\n" + gate_eval.markdown_gate(report)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(_finite(report), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return paths


def _finite(value):
    """The report with every NaN or infinity as null, so report.json is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
