"""The gate frontier study's forms and rules (aligner_export.tools.gate_study) on synthetic residuals: the harmful
signal sits in one token in the middle of the prompt, where a last-token gate cannot see it and a max-pooled one
must."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aligner_export.tools import gate_study  # noqa: E402
from aligner_runtime.errors import AlignerError  # noqa: E402

H, LAYER = 16, 3


def _residuals(labels, rng):
    """Per prompt 5-12 unit tokens; a harmful prompt has one token near the signal direction, not the last one."""
    signal = np.zeros(H, np.float32)
    signal[0] = 1.0
    rows, offsets = [], [0]
    for label in labels:
        length = int(rng.integers(5, 13))
        x = rng.normal(size=(length, H)).astype(np.float32)
        x[:, 0] = 0.0
        if label:
            x[int(rng.integers(0, length - 1))] = signal * 4 + rng.normal(size=H).astype(np.float32) * 0.1
        rows.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        offsets.append(offsets[-1] + length)
    return {f"l{LAYER}": np.concatenate(rows).astype(np.float16), "offsets": np.array(offsets)}


def _fit_and_score(form, residuals, labels):
    whiteners = {LAYER: gate_study._whitener(residuals[f"l{LAYER}"], np.random.default_rng(0))}
    prompts = gate_study.Prompts(residuals, [LAYER], whiteners)
    torch.manual_seed(0)
    gate = gate_study.make_gate(form, [LAYER], dim=whiteners[LAYER][0].shape[0])
    sources = np.array(["s"] * len(labels))
    gate_study.fit(gate, prompts, labels, np.ones(len(labels)), np.ones(len(labels), bool), 1e-3, 0.0, 80)
    with torch.no_grad():
        return gate(prompts).numpy(), sources


def test_max_pooling_finds_a_signal_that_the_last_token_misses():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 40)
    residuals = _residuals(labels, rng)
    accuracy = {}
    for form in ("last", "max"):
        scores, _ = _fit_and_score(form, residuals, labels)
        threshold = np.median(scores)
        accuracy[form] = float(((scores > threshold) == labels).mean())
    assert accuracy["max"] > 0.95
    assert accuracy["last"] < 0.8


def test_the_max_term_is_the_largest_token_score():
    rng = np.random.default_rng(2)
    labels = np.array([0, 1, 0, 1])
    residuals = _residuals(labels, rng)
    whiteners = {LAYER: gate_study._whitener(residuals[f"l{LAYER}"], np.random.default_rng(0))}
    prompts = gate_study.Prompts(residuals, [LAYER], whiteners)
    gate = gate_study.make_gate("max", [LAYER], dim=whiteners[LAYER][0].shape[0])
    with torch.no_grad():
        gate.u_max.normal_()
        gate.bias.fill_(0.5)
        scores = gate(prompts).numpy()
    X, offsets, u = prompts.X[LAYER].numpy(), residuals["offsets"], gate.u_max[0].detach().numpy()
    expected = [0.5 + (X[a:b] @ u).max() for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_thresholds_spend_the_budget_of_each_rule():
    scores = np.arange(200, dtype=np.float64)
    classes = np.array(["harmless"] * 100 + ["borderline"] * 100)
    rewrites = np.array(["", "format:0"] * 50 + [""] * 100)
    held = np.ones(200, bool)
    rules = gate_study.thresholds(scores, classes, rewrites, held)
    assert rules["generic"] == 96.0  # 2% of the 50 plain generic scores (0, 2, ..., 98) lie above it
    assert rules["calibrate"] == 189.0  # the borderline budget binds: 10 of its 100 scores lie above


def test_figures_per_group():
    scores = np.array([1.0, -1.0, 2.0, 0.05, -2.0, 3.0])
    groups = np.array(["harmful:a", "harmful:a", "bypass_base", "bypass:roleplay", "harmless:g", "wrapped"])
    labels = np.array([1, 1, 1, 1, 0, 1])
    f = gate_study.figures(scores, groups, labels, 0.0)
    assert f["tpr"] == {"a": 0.5}
    assert f["bypass_ratio"] == {"roleplay": 1.0}
    assert f["fpr_generic"] == 0.0 and f["wrapped"] == 1.0
    assert f["near_threshold"] == 1


def test_unknown_form_is_refused():
    with pytest.raises(AlignerError, match="unknown gate form"):
        gate_study.make_gate("last+median", [LAYER], dim=4)
