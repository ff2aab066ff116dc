"""``aligner-export eval`` in corpus mode, on a trimmed copy of the shipped corpus with a stand-in for the runtime: the
steering alone per held-out source, harmless prompts with the gate forced open, the targets and the report (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligner_export.evaluation.corpus_eval import FORCED_SOURCES, TARGETS, is_fluent
from aligner_export.evaluation.gate_eval import markdown_gate
from aligner_export.evaluation.judge import KeywordJudge

CORPUS = Path(__file__).resolve().parents[1] / "export" / "aligner_export" / "data" / "corpus"
PER_SOURCE = 6


def _trimmed(dest: Path) -> Path:
    """The first short records of every (source, role) of each corpus file, in the shipped layout (the tiny model's
    context is 256 tokens: no context passages, no long templates)."""
    dest.mkdir()
    for path in CORPUS.glob("*.jsonl"):
        kept, seen = [], {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("context") or len(row["text"]) > (250 if "templates" in path.name else 150):
                continue
            key = (row["source"], row["role"])
            if seen.get(key, 0) < PER_SOURCE:
                seen[key] = seen.get(key, 0) + 1
                kept.append(line)
        (dest / path.name).write_text("\n".join(kept) + "\n")
    return dest


def test_is_fluent():
    assert is_fluent("I'm sorry, but I can't help with that.")
    assert not is_fluent("no no no no no no no no")
    assert not is_fluent("ok")


class _Answer:
    def __init__(self, text, finish_reason):
        self.text, self.finish_reason, self.token_ids = text, finish_reason, text.split()


class _Comparison:
    """Stands in for UnsteeredComparison: harmful prompts get a clean refusal every other time, harmless ones a loop
    every third time."""

    def forced_open(self, prompts, **_options):
        out = []
        for i, prompt in enumerate(prompts):
            if i % 3 == 2:
                out.append(_Answer("yes yes yes yes yes yes yes yes", "length"))
            elif i % 2 == 0:
                out.append(_Answer("I'm sorry, but I can't help with that.", "stop"))
            else:
                out.append(_Answer("Here is a careful answer to your question.", "stop"))
        return out


def test_forced_open_report_counts_per_source(tmp_path):
    import random

    from aligner_export import corpus
    from aligner_export.evaluation import gate_eval
    from aligner_export.evaluation.corpus_eval import forced_open_report

    directory = _trimmed(tmp_path / "corpus")
    sets = gate_eval.heldout_sets(corpus.load_corpus(directory), corpus.load_templates(directory), 0, 4)
    forced = forced_open_report(_Comparison(), KeywordJudge(), sets, 3, random.Random(0), {})
    assert set(forced["sources"]) == set(FORCED_SOURCES)
    for entry in forced["sources"].values():
        # answer 0 refuses cleanly, 1 complies, 2 loops without refusing
        assert entry["count"] == 3 and entry["refusal_rate"] == pytest.approx(1 / 3)
        assert entry["clean_refusal_rate"] == 1.0
    assert forced["refusal_rate"] == pytest.approx(1 / 3)
    assert forced["harmless"]["count"] == 3 and forced["harmless"]["fluent_rate"] == pytest.approx(2 / 3)
    report = {"forced_open": forced, "sets": {}, "summary": {"gate0_identical_rate": 1.0},
              "gate": {"harmful": {"harmbench_val": {"tpr": 1.0, "count": 4}}, "wrapped": {"tpr": 1.0, "count": 1},
                       "generic_fpr": 0.0, "borderline_fpr": 0.0, "roc": {},
                       "bypass": {"families": {}, "base_count": 0, "plain_recall": None}, "encodings": {},
                       "harmless": {}, "borderline": {}}}
    from aligner_export.evaluation.corpus_eval import check_targets

    report["targets"] = check_targets(report)
    figures = {t["figure"]: t for t in report["targets"]}
    assert set(figures) == set(TARGETS)
    assert figures["gate-0 answers identical to unsteered"]["met"] is True
    assert figures["refusals with the gate forced open (worst held-out source)"]["met"] is False
    text = markdown_gate(report)
    assert "## The steering alone: gate forced open" in text
    for name in FORCED_SOURCES:
        assert f"| {name} | 3 |" in text


class _Export:
    path = Path("stand-in-export")


class _ScoringAligner:
    """Stands in for Aligner in a gate-only run: a deterministic score per prompt (some of them near the threshold),
    and no generation (any call to it fails the test)."""

    export = _Export()

    @staticmethod
    def score_of(prompt: str) -> float:
        return (len(prompt) % 9 - 4) * 0.04

    def score(self, prompts, system=None, batch_size=8):
        return [(float(self.score_of(p) > 0), self.score_of(p)) for p in prompts]

    def encode(self, prompt, system=None):
        return list(range(len(prompt.split()) + (len(system.split()) if system else 0) + 5))

    def __getattr__(self, name):
        raise AssertionError(f"a gate-only evaluation must not use Aligner.{name}")


def test_gate_only_report_scores_without_generating(tmp_path):
    """``eval --gate-only``: the gate's figures and the margin of the decision from scoring alone, the generation
    targets left unmeasured, and a report without the answers' plot."""
    from aligner_export import corpus
    from aligner_export.evaluation import gate_eval
    from aligner_export.evaluation.corpus_eval import run_corpus_eval
    from aligner_export.evaluation.evaluate import write_report

    directory = _trimmed(tmp_path / "corpus")
    lines = []
    report = run_corpus_eval(_ScoringAligner(), KeywordJudge(), directory, gate_limit=4, generate=False,
                             log=lines.append)
    assert len(lines) == 1 and "no answers (gate only); estimated 0 min" in lines[0]
    assert report["gate_only"] and "sets" not in report and "forced_open" not in report
    # the margin, counted independently over the same held-out harmful records (copyright apart)
    sets = gate_eval.heldout_sets(corpus.load_corpus(directory), corpus.load_templates(directory), 0, 4)
    harmful = [r for name, group in sets.harmful.items() if not name.endswith(":copyright") for r in group]
    within = sum(abs(_ScoringAligner.score_of(r.prompt)) < gate_eval.MARGIN for r in harmful)
    assert report["gate"]["margin"] == {"band": gate_eval.MARGIN, "count": len(harmful), "within": within}
    assert 0 < within < len(harmful)
    figures = {t["figure"]: t for t in report["targets"]}
    assert figures["steered ASR (HarmBench standard + contextual)"]["met"] is None
    assert figures["refusals with the gate forced open (worst held-out source)"]["value"] is None
    assert figures["gate FPR, generic harmless"]["value"] is not None
    paths = write_report(report, tmp_path / "report")
    assert set(paths) == {"json", "md", "gate_png"} and not (tmp_path / "report" / "report.png").exists()
    text = paths["md"].read_text()
    assert f"{within} of {len(harmful)} held-out harmful prompts" in text
    assert "gate forced open" not in text.split("## Targets")[1].split("## Gate per")[1]
