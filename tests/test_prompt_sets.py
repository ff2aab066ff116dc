"""The default prompt sets the package ships (issue 2, item 4): sizes, no duplicates, held-out files kept apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aligner_runtime.prompts import load_prompts

PROMPTS = Path(__file__).resolve().parents[1] / "export" / "aligner_export" / "data" / "prompts"
# Calibration sets need >= 120 per class (issue 2); the shipped sets aim for 150. Held-out sets: >= 60 each.
MIN_COUNTS = {"harmful.txt": 150, "harmless.txt": 150, "harmful_heldout.txt": 60, "harmless_heldout.txt": 60}
CALIBRATION = ("harmful.txt", "harmless.txt")
HELDOUT = ("harmful_heldout.txt", "harmless_heldout.txt")
# Harmless prompts that a keyword filter would flag: the gate must learn to let them through.
ALARMING = re.compile(r"\b(kill|shoot|attack|explo\w*|bomb\w*|poison\w*|murder|terminate|abort|crack|hack|steal|"
                      r"destroy|blow|nuclear|chemicals?|dangerous|lethal|choke|choking|slaughter|exploit|purge|"
                      r"execute|plague|black death|fission|disaster|gun|weapon\w*|toxic\w*|sink|burn\w*|"
                      r"virus\w*|scam\w*|phishing|flu|pandemic|eruption|dying|bleed|drop|stroke|heart attack|"
                      r"carbon monoxide|fireworks|denial-of-service|manhattan project|hiroshima|chernobyl)\b", re.I)


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@pytest.fixture(scope="module")
def sets() -> dict[str, list[str]]:
    return {name: load_prompts(PROMPTS / name) for name in MIN_COUNTS}


def test_every_file_has_a_licence_header() -> None:
    for name in MIN_COUNTS:
        first = (PROMPTS / name).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#") and "Apache-2.0" in first, name


@pytest.mark.parametrize("name", sorted(MIN_COUNTS))
def test_counts(sets: dict[str, list[str]], name: str) -> None:
    assert len(sets[name]) >= MIN_COUNTS[name]
    # load_prompts enforces the same minimum as calibration would.
    assert load_prompts(PROMPTS / name, min_count=MIN_COUNTS[name]) == sets[name]


def test_no_duplicates_within_or_across_files(sets: dict[str, list[str]]) -> None:
    seen: dict[str, str] = {}
    for name, prompts in sets.items():
        for prompt in prompts:
            key = _normalise(prompt)
            assert key not in seen, f"{prompt!r} in {name} duplicates one in {seen[key]}"
            seen[key] = name


def test_heldout_sets_do_not_overlap_calibration(sets: dict[str, list[str]]) -> None:
    calibration = {_normalise(p) for name in CALIBRATION for p in sets[name]}
    for name in HELDOUT:
        assert not calibration & {_normalise(p) for p in sets[name]}, name


def test_harmless_sets_include_alarming_words(sets: dict[str, list[str]]) -> None:
    assert sum(bool(ALARMING.search(p)) for p in sets["harmless.txt"]) >= 40
    assert sum(bool(ALARMING.search(p)) for p in sets["harmless_heldout.txt"]) >= 15
