"""The linear gate's fit (issue 10, ``aligner_export.gate``) against independent computations: the pooled features,
the folded standardisation, the Neyman-Pearson threshold, the leave-one-source-out folds, a planted direction on
synthetic features, and the fitted pack's gate against the PyTorch reference hooks on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligner_export.gate import (Candidate, Features, _folds, default_candidates, fit_gate, fit_linear, np_threshold,
                                 selection_key)
from aligner_runtime.errors import AlignerError

from test_calibrate import HARMFUL, HARMLESS, _independent_tails


def _features(rng, n_per_source=60, layers=(1, 2, 3), k_max=4, hidden=16, signal=3.0, seed=0):
    """Synthetic tails: two harmful and two harmless sources, one rewrite family on both labels. The label lives in
    a direction of layer 2 at the last token (drawn from ``seed``, so that fresh samples share it); the rewrite adds
    a large nuisance vector at every layer."""
    fixed = np.random.default_rng(seed)
    direction = fixed.standard_normal(hidden)
    direction /= np.linalg.norm(direction)
    nuisance = 4.0 * fixed.standard_normal(hidden)
    rows, labels, classes, sources, rewrites = [], [], [], [], []
    for label, cls, names in ((1, "harmful", ("h1", "h2")), (0, "harmless", ("g1", "g2")),
                              (0, "borderline", ("b1",))):
        for name in names:
            for i in range(n_per_source):
                x = rng.standard_normal((len(layers), k_max, hidden)) + 5.0 * np.eye(hidden)[0]
                if label:
                    x[layers.index(2), -1] += signal * direction
                rewrite = "suffix" if i % 4 == 0 else ""
                if rewrite:
                    x += nuisance
                rows.append(x)
                labels.append(label)
                classes.append(cls)
                sources.append(name)
                rewrites.append(rewrite)
    return Features(tails=np.stack(rows).astype(np.float16), layers=layers, labels=np.array(labels),
                    classes=np.array(classes), sources=np.array(sources), rewrites=np.array(rewrites)), direction


def test_pooled_is_the_mean_of_normalised_last_tokens():
    rng = np.random.default_rng(0)
    features, _ = _features(rng, n_per_source=3)
    got = features.pooled((1, 3), 2, True)
    for n in range(len(features.labels)):
        expected = []
        for layer in (1, 3):
            tail = features.tails[n, features.layers.index(layer)].astype(np.float32)
            last = [tail[-2] / np.linalg.norm(tail[-2]), tail[-1] / np.linalg.norm(tail[-1])]
            expected.append((last[0] + last[1]) / 2)
        np.testing.assert_allclose(got[n], np.concatenate(expected), rtol=1e-5, atol=1e-6)
    raw = features.pooled((2,), 1, False)
    np.testing.assert_allclose(raw, features.tails[:, 1, -1].astype(np.float32))


def test_fit_linear_folds_the_standardisation():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 6)) * np.array([1, 10, 0.1, 5, 1, 2]) + 3
    labels = (X[:, 0] + 0.1 * X[:, 1] + rng.standard_normal(80) > 4).astype(int)
    sources = np.array(["a", "b"] * 40)
    fit = fit_linear(X, labels, sources, C=0.5)
    Z = (X - X.mean(0)) / X.std(0)
    model = LogisticRegression(C=0.5, max_iter=3000).fit(Z, labels, sample_weight=_balanced(labels, sources))
    np.testing.assert_allclose(fit.score(X), model.decision_function(Z), rtol=1e-4, atol=1e-4)


def test_operating_point_objective_is_a_reweighted_second_fit():
    """``objective="operating-point"``: a second logistic fit in which the negatives scoring in the top HARD_SHARE of
    the negatives (on the first fit) and the positives scoring below that cut weigh HARD_WEIGHT, computed here
    independently with scikit-learn."""
    from sklearn.linear_model import LogisticRegression

    from aligner_export.gate import HARD_SHARE, HARD_WEIGHT

    rng = np.random.default_rng(5)
    X = rng.standard_normal((120, 5)) * np.array([1, 3, 0.5, 2, 1]) - 1
    labels = (X[:, 0] - 0.2 * X[:, 1] + 0.8 * rng.standard_normal(120) > -1).astype(int)
    sources = np.array(["a", "b", "c"] * 40)
    Z = (X - X.mean(0)) / X.std(0)
    base = _balanced(labels, sources)
    first = LogisticRegression(C=0.5, max_iter=3000).fit(Z, labels, sample_weight=base).decision_function(Z)
    negatives = np.sort(first[labels == 0])
    cut = np.quantile(negatives, 1 - HARD_SHARE)
    extra = np.where(((labels == 0) & (first >= cut)) | ((labels == 1) & (first <= cut)), HARD_WEIGHT, 1.0)
    assert 1 < (extra > 1).sum() < len(labels) // 2
    weights = base * extra / extra.mean()
    second = LogisticRegression(C=0.5, max_iter=3000).fit(Z, labels, sample_weight=weights).decision_function(Z)
    fit = fit_linear(X, labels, sources, C=0.5, objective="operating-point")
    np.testing.assert_allclose(fit.score(X), second, rtol=1e-4, atol=1e-4)
    assert np.abs(second - first).max() > 1e-2  # the reweighting moves the fit
    with pytest.raises(AlignerError, match="objective must be one of"):
        fit_linear(X, labels, sources, C=0.5, objective="hinge")


def test_fit_gate_records_each_objective_and_rejects_an_unknown_one():
    rng = np.random.default_rng(3)
    features, _ = _features(rng, signal=4.5)
    candidates = [Candidate((1, 2, 3), 1, False, 0.01)]
    plain, _ = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, objective="logistic")
    hard, _ = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, objective="operating-point")
    assert not np.allclose(plain.weights[2], hard.weights[2])
    with pytest.raises(AlignerError, match="--gate-objective must be one of"):
        fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, objective="auc")


def _balanced(labels, sources):
    """Independent: every class weighs the same, and every source within a class."""
    weights = np.empty(len(labels))
    for label in (0, 1):
        names = sorted(set(sources[labels == label]))
        for name in names:
            rows = (labels == label) & (sources == name)
            weights[rows] = 1.0 / (len(names) * rows.sum())
    return weights / weights.mean()


@pytest.mark.parametrize("seed", range(5))
def test_np_threshold_is_the_smallest_within_both_budgets(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(300)
    classes = rng.choice(["harmless", "borderline"], size=300, p=[0.7, 0.3])
    budgets = {"harmless": 0.02, "borderline": 0.10}
    threshold = np_threshold(scores, classes, budgets["harmless"], budgets["borderline"])
    for cls, budget in budgets.items():
        assert (scores[classes == cls] > threshold).mean() <= budget
    lower = scores[scores < threshold].max()  # the next candidate below: some budget must break there
    assert any((scores[classes == cls] > lower).mean() > budget for cls, budget in budgets.items())


def test_folds_hold_out_each_source_and_each_rewrite_family():
    features, _ = _features(np.random.default_rng(2), n_per_source=8)
    features.sources = features.sources.astype(object)
    features.sources[:2] = "wrapped:gptfuzz"  # wrapped prompts are never a fold
    folds = {name: (test, excluded) for name, test, excluded in _folds(features, seed=0)}
    assert sorted(folds) == ["rewrite suffix", "source h1", "source h2"]
    test, excluded = folds["rewrite suffix"]
    in_family = features.rewrites == "suffix"
    np.testing.assert_array_equal(test, in_family & (features.labels == 1))
    np.testing.assert_array_equal(excluded, in_family & (features.labels == 0))
    assert not folds["source h1"][1].any()


def test_fit_gate_recovers_a_planted_direction_within_budget():
    rng = np.random.default_rng(3)
    features, direction = _features(rng, signal=4.5)
    candidates = [Candidate((1,), 1, False, 0.01), Candidate((1, 2, 3), 1, False, 0.01),
                  Candidate((2,), 4, False, 0.01)]
    gate, report = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, seed=0,
                            threshold_rule="budgets")
    assert report.candidate == candidates[1]  # the only one that reads layer 2's last token alone
    assert gate.layers == (1, 2, 3) and gate.version == 2 and gate.tokens == 1
    assert report.heldout["fpr_harmless"] <= 0.05 and report.heldout["fpr_borderline"] <= 0.10
    w2 = gate.weights[2] / np.linalg.norm(gate.weights[2])
    assert abs(w2 @ direction) > 0.8
    # The gate as the contract computes it (score = Σ w_l·h_l + b, fires above 0) on fresh prompts of the same kind.
    fresh, _ = _features(np.random.default_rng(4), signal=4.5)
    tails = fresh.tails.astype(np.float32)
    scores = sum(tails[:, fresh.layers.index(l), -1] @ gate.weights[l] for l in gate.layers) + gate.bias
    assert (scores[fresh.labels == 1] > 0).mean() > 0.9
    assert (scores[fresh.classes == "harmless"] > 0).mean() < 0.1
    # The report's held-out scores are the fitted gate's score, threshold included, on the held-out rows.
    for key, values in report.scores.items():
        assert key.split(":")[0] in ("harmless", "borderline") and len(values) > 0


def test_selection_weighs_the_worst_fold():
    steady = {"mean_tpr": 0.80, "min_tpr": 0.60}
    spiky = {"mean_tpr": 0.85, "min_tpr": 0.10}
    assert selection_key(steady) > selection_key(spiky)


@pytest.mark.parametrize("num_layers", [1, 2, 4, 12, 24, 30, 32, 80])
def test_default_candidates_are_valid_layer_sets(num_layers):
    candidates = default_candidates(num_layers)
    assert candidates and len(candidates) <= 6
    for c in candidates:
        assert c.layers and list(c.layers) == sorted(set(c.layers))
        assert all(0 <= l < num_layers for l in c.layers) and c.tokens in (1, 4)
    if num_layers == 30:
        assert candidates[0].layers == (9, 12, 15, 18, 21, 24, 27, 29)


@pytest.mark.parametrize("tokens", [1, 4])
def test_fitted_gate_matches_reference_hooks_and_independent_scores(tiny_model_dir, tokens):
    """Calibration's tails (left-padded batches) and the pack's gate give, on the reference hooks, the score an
    independent per-prompt computation gives from the pack's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner_export.hf.calibrate import calibrate
    from aligner_export.hf.reference import score_prompts

    target, aligned = tiny_model_dir("llama", seed=0), tiny_model_dir("llama", seed=1)
    pack = calibrate(target, HARMFUL, HARMLESS, aligned, seed=0, batch_size=5,
                     candidates=[Candidate((1, 3), tokens, True, 0.01)])
    gate = pack.fitted_gate()
    assert gate.layers == (1, 3) and gate.tokens == tokens and gate.normalize

    prompts = HARMFUL + HARMLESS
    tails = _independent_tails(target, prompts, tokens)
    unit = tails / np.linalg.norm(tails, axis=-1, keepdims=True)
    expected = sum(unit[:, l].mean(axis=1) @ gate.weights[l] for l in gate.layers) + gate.bias

    tok = AutoTokenizer.from_pretrained(target)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = pack.steer_config([3], 1.0, gate)
    fired, score = score_prompts(model, config, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(score.numpy().reshape(-1), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fired.numpy().reshape(-1) > 0.5, expected > 0)


@pytest.mark.parametrize("seed", range(3))
def test_generic_threshold_rule_binds_only_the_plain_generic_budget(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(400)
    classes = rng.choice(["harmless", "borderline"], size=400, p=[0.7, 0.3])
    rewritten = rng.random(400) < 0.3
    scores[classes == "borderline"] += 1.0  # hard negatives: under "budgets" they set the threshold
    scores[rewritten] += 0.5
    plain = (classes == "harmless") & ~rewritten
    generic = np_threshold(scores, classes, 0.02, 0.10, "generic", rewritten)
    budgets = np_threshold(scores, classes, 0.02, 0.10, "budgets", rewritten)
    assert generic == np_threshold(scores[plain], classes[plain], 0.02, 1.0)
    assert (scores[plain] > generic).mean() <= 0.02
    assert generic < budgets  # it spends the budget where the other rule leaves it unspent
    with pytest.raises(ValueError, match="threshold rule"):
        np_threshold(scores, classes, 0.02, 0.10, "oracle")


def test_fit_gate_reports_the_rule_and_the_rewritten_negatives():
    rng = np.random.default_rng(3)
    features, _ = _features(rng, signal=4.5)
    candidates = [Candidate((1, 2, 3), 1, False, 0.01)]
    _, budgets = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, seed=0,
                          threshold_rule="budgets")
    _, generic = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, seed=0,
                          threshold_rule="generic")
    assert generic.threshold <= budgets.threshold
    assert "fpr_rewritten" in generic.heldout
    with pytest.raises(AlignerError, match="--threshold-rule"):
        fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, threshold_rule="oracle")
