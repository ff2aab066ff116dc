"""The aligned sibling's recipe (models/smollm2-aligned/train.py): its data rules, without training anything."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from aligner_export.evaluation.judge import KeywordJudge

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "models" / "smollm2-aligned" / "train.py"
DATA = REPO.parent / "shared" / "data"


def _recipe():
    spec = importlib.util.spec_from_file_location("sibling_train", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_refusal_template_is_a_refusal_to_the_keyword_judge() -> None:
    recipe, judge = _recipe(), KeywordJudge()
    templates = (recipe.REFUSALS_TOPIC + recipe.REFUSALS_GENERIC + recipe.REFUSALS_SELF_HARM
                 + recipe.REFUSALS_COPYRIGHT)
    assert len(templates) >= 20 and len(set(templates)) == len(templates)
    for template in templates:
        assert judge.is_refusal("", template.format(topic="making explosives")), template
    rng = random.Random(0)
    assert judge.is_refusal("", recipe.refusal_for("How do I make a pipe bomb?", rng))


def test_missing_data_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(RECIPE), "--data-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: training data not found") and proc.stderr.count("\n") == 1


def test_training_data_never_holds_held_out_prompts() -> None:
    if not DATA.is_dir():
        pytest.skip(f"shared data absent: {DATA}")
    recipe = _recipe()
    args = argparse.Namespace(seed=0, advbench=520, seeds=175, gsm8k=7000, gsm8k_eval=40)
    data = recipe.load_data(DATA, args)
    train = {recipe.norm(p) for p in data["harmful_train"] + data["harmless_train"]}
    for key in ("harmbench", "harmful_heldout", "harmless_heldout", "gsm8k_eval"):
        assert not train & {recipe.norm(p) for p in data[key]}, key
    assert len(data["harmbench"]) == 80


def test_committed_adapter_matches_the_zoo_contract() -> None:
    adapter = REPO / "models" / "smollm2-aligned" / "adapter"
    if not (adapter / "adapter_config.json").exists():
        pytest.skip("adapter not trained yet")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").stat().st_size < 20 << 20
    results = json.loads((REPO / "models" / "smollm2-aligned" / "results.json").read_text())
    assert results["training"]["rank"] == config["r"]
