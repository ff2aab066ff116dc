"""The pooled gate's fit (SteerGate version 3, issue 18; ``aligner_export.gate``): the token features calibration
keeps, the max term on a synthetic set whose signal sits at a random early position (where a last-token gate
cannot see it), the folding into plain ``[H]`` vectors against an independent numpy score, the memory refusal, the
fallback to the linear gate, and the forward pass's token coordinates against an unpadded per-prompt run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligner_export import gate as gate_module
from aligner_export.gate import (Candidate, Features, TokenCollector, fit_gate, fit_linear, fit_pooled,
                                 pooled_gate_config, token_feature_bytes)
from aligner_runtime.errors import AlignerError

from test_calibrate import HARMFUL, HARMLESS

LAYERS = (1, 2)
HIDDEN = 16


def _prompts(rng, n_per_source=40, signal=3.0, where="early", seed=0):
    """Raw residuals ``[length, H]`` per prompt and layer. The label lives in one direction of layer 2 at one
    position: a random early one (``early``: never among the last 4) or the last (``last``); every token also
    carries a common offset and noise, and the positives' other tokens look like the negatives'."""
    direction = np.random.default_rng(seed).standard_normal(HIDDEN)
    direction /= np.linalg.norm(direction)
    prompts, labels, classes, sources = [], [], [], []
    for label, cls, names in ((1, "harmful", ("h1", "h2", "h3")), (0, "harmless", ("g1", "g2")),
                              (0, "borderline", ("b1",))):
        for name in names:
            for _ in range(n_per_source):
                length = int(rng.integers(10, 24))
                x = rng.standard_normal((len(LAYERS), length, HIDDEN)) + 3.0 * np.eye(HIDDEN)[0]
                if label:
                    at = int(rng.integers(0, length - 4)) if where == "early" else length - 1
                    x[LAYERS.index(2), at] += signal * direction
                prompts.append(x.astype(np.float16).astype(np.float64))  # the tails store float16
                labels.append(label)
                classes.append(cls)
                sources.append(name)
    return prompts, np.array(labels), np.array(classes), np.array(sources)


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _features(prompts, labels, classes, sources, dtype=np.float16, sample_tokens=400, dim=8):
    tails = np.stack([p[:, -4:] for p in prompts]).astype(np.float16)
    features = Features(tails=tails, layers=LAYERS, labels=labels, classes=classes, sources=sources)
    collector = TokenCollector(LAYERS, [p.shape[1] for p in prompts], HIDDEN, dim=dim, sample_tokens=sample_tokens,
                               dtype=dtype)
    for i in np.random.default_rng(9).permutation(len(prompts)):
        collector.add(int(i), [_unit(p) for p in prompts[i]])
    return features, collector.finish()


def _op_score(gate, prompts) -> np.ndarray:
    """Independent: the operator's score from raw residuals, ``Σ_l w_l·mean_K n(h_l) + max_s u_l·n(h_l[s]) + b``."""
    scores = []
    for p in prompts:
        unit = _unit(p.astype(np.float64))
        total = gate.bias
        for l in gate.layers:
            total += unit[LAYERS.index(l), -gate.tokens:].mean(axis=0) @ gate.weights[l]
            max_weights = getattr(gate, "max_weights", None)
            if max_weights:
                total += (unit[LAYERS.index(l)] @ max_weights[l]).max()
        scores.append(total)
    return np.array(scores)


def test_pooled_fit_sees_an_early_signal_that_a_last_token_gate_misses():
    data = _prompts(np.random.default_rng(0), n_per_source=120, signal=8.0)
    features, tokens = _features(*data)
    candidates = [Candidate(LAYERS, 1, True, 0.1)]
    logs = []
    gate, report = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, seed=0, tokens=tokens,
                            log=logs.append)
    linear, _ = fit_gate(features, candidates, max_fpr=0.05, max_fpr_borderline=0.10, seed=0)
    assert gate.version == 3 and linear.version == 2 and report.pooled["kept"] == "pooled"
    assert report.pooled["selection_key"] > report.pooled["linear_selection_key"]
    assert report.heldout["loso_min_tpr"] == report.pooled["min_tpr"]
    assert any("keeping pooled" in line for line in logs)
    # Fresh prompts of the same kind, scored as the operator scores them (plain vectors on raw residuals).
    fresh, labels, _, _ = _prompts(np.random.default_rng(1), signal=8.0)
    pooled_scores, linear_scores = _op_score(gate, fresh), _op_score(linear, fresh)
    assert (pooled_scores[labels == 1] > 0).mean() > 0.95
    assert (pooled_scores[labels == 0] > 0).mean() < 0.15
    assert (linear_scores[labels == 1] > 0).mean() < 0.2  # a last-token gate cannot separate this set


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-4), (np.float16, 2e-2)])
def test_folded_gate_scores_as_the_fit_does(dtype, atol):
    """The fit's score (whitened float coordinates, the linear gate's score, the fitted scale and bias) equals the
    score of the version-3 gate it folds into, recomputed from the raw normalised residuals: exactly (1e-4) where
    the coordinates are float32, within float16's rounding where they are stored as calibration stores them."""
    prompts, labels, classes, sources = _prompts(np.random.default_rng(5), n_per_source=20, signal=2.0)
    features, tokens = _features(prompts, labels, classes, sources, dtype=dtype, sample_tokens=200)
    candidate = Candidate(LAYERS, 3, True, 0.5)
    X = features.pooled(candidate.layers, candidate.tokens, candidate.normalize)
    linear = fit_linear(X, labels, sources, candidate.C)
    train = np.random.default_rng(6).random(len(labels)) < 0.8
    directions = {l: linear.weights[i * HIDDEN:(i + 1) * HIDDEN] for i, l in enumerate(LAYERS)}
    pooled = fit_pooled(linear.score(X), tokens, LAYERS, labels, sources, train, candidate.C, 40, directions)
    assert np.abs(pooled.u).max() > 0.05 and pooled.scale != 1.0  # the fit moved away from its start
    fit_scores = pooled.score(linear.score(X), tokens)
    gate = pooled_gate_config(linear, pooled, tokens, candidate, threshold=0.25, hidden=HIDDEN)
    assert all(gate.max_weights[l].shape == (HIDDEN,) for l in LAYERS)
    np.testing.assert_allclose(_op_score(gate, prompts), fit_scores - 0.25, atol=atol)


def test_token_memory_is_refused_before_allocation():
    lengths = [1000] * 50
    need = token_feature_bytes(50_000, 2, 16, HIDDEN)
    assert need == 2 * 2 * (50_000 * 16 + (8192 + 4096) * HIDDEN)
    with pytest.raises(AlignerError, match=rf"{need / 2 ** 20:.0f} MiB .*50000 prompt tokens x 2 layers x 16 dims"
                                           r".*limit of 1 MiB"):
        TokenCollector(LAYERS, lengths, HIDDEN, dim=16, limit=1 << 20)
    TokenCollector(LAYERS, lengths, HIDDEN, dim=16, limit=need)  # at the limit: accepted


def test_pooled_falls_back_to_the_linear_gate_when_it_validates_no_better():
    """With the signal at the last token the linear gate is already perfect on every fold; the max term cannot beat
    it, so the linear gate (version 2) is kept, and the log says so."""
    data = _prompts(np.random.default_rng(2), n_per_source=60, signal=8.0, where="last")
    features, tokens = _features(*data)
    logs = []
    gate, report = fit_gate(features, [Candidate(LAYERS, 1, True, 0.1)], max_fpr=0.05, max_fpr_borderline=0.10,
                            seed=0, tokens=tokens, log=logs.append)
    linear, linear_report = fit_gate(features, [Candidate(LAYERS, 1, True, 0.1)], max_fpr=0.05,
                                     max_fpr_borderline=0.10, seed=0)
    assert report.pooled["kept"] == "linear" and gate.version == 2
    assert report.pooled["linear_selection_key"] == 1.0 and report.pooled["selection_key"] <= 1.0
    assert any(line.startswith("pooled gate: selection key") and line.split(";")[1].startswith(" keeping linear")
               for line in logs)
    for l in LAYERS:  # the same gate as a plain linear fit
        np.testing.assert_array_equal(gate.weights[l], linear.weights[l])
    assert gate.bias == linear.bias and report.heldout == linear_report.heldout


def _independent_units(model_dir, prompts, layers) -> list[np.ndarray]:
    """Per prompt ``[len(layers), length, H]``: every position's normalised layer output, each prompt alone and
    unpadded, through ``output_hidden_states`` (not the last layer: the final norm is not removed here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        out.append(_unit(np.stack([hs[l + 1][0].numpy() for l in layers])))
    return out


def test_forward_pass_keeps_every_prompt_token(tiny_model_dir):
    """Calibration's left-padded, shuffled batches give every valid position of every prompt: the stored
    coordinates are the basis projection of an unpadded per-prompt run's normalised residuals."""
    from aligner_export.hf.calibrate import collect_activations
    from aligner_export.hf.modeling import load_model

    target = tiny_model_dir("llama", seed=0)
    prompts = HARMFUL + HARMLESS
    model, tokenizer = load_model(target)
    acts = collect_activations(model, tokenizer, prompts, batch_size=5, tail_layers=(1, 2), token_layers=(1, 2),
                               seed=3)
    tokens = acts.tokens
    assert tokens.layers == (1, 2) and tokens.count == len(prompts)
    np.testing.assert_array_equal(np.diff(tokens.offsets), acts.lengths)
    expected = _independent_units(target, prompts, (1, 2))
    for i, units in enumerate(expected):
        rows = slice(tokens.offsets[i], tokens.offsets[i + 1])
        for j, layer in enumerate(tokens.layers):
            basis = tokens.bases[layer]
            got = tokens.coords[layer][rows].astype(np.float32)
            np.testing.assert_allclose(got, basis.project(units[j]), atol=2e-2 * max(1.0, np.abs(got).max()))
    with pytest.raises(AlignerError, match="pooled gate would keep"):
        collect_activations(model, tokenizer, prompts, batch_size=5, tail_layers=(1,), token_layers=(1,),
                            token_limit=1000)


@pytest.mark.parametrize("keep", [True, False])
def test_calibrate_with_the_pooled_gate(tiny_model_dir, monkeypatch, keep):
    """A tiny-model calibration with ``gate="pooled"``: the comparison is recorded and logged, and the pack holds
    the version-3 gate (``gate.max_weight`` beside ``gate.weight``) whose score, recomputed from an unpadded
    per-prompt run, is the fit's on the held-out prompts, or (the key forced the other way) the linear gate alone."""
    from aligner_export.gate import _negative_holdout
    from aligner_export.hf.calibrate import calibrate

    # Which form wins is forced: the tiny random model's folds decide nothing worth asserting.
    monkeypatch.setattr(gate_module, "selection_key",
                        lambda result: float(result["candidate"].endswith("+max") == keep))
    captured = {}
    real_fit_gate = gate_module.fit_gate

    def fit_gate(*args, **kwargs):
        captured["result"] = real_fit_gate(*args, **kwargs)
        return captured["result"]

    from aligner_export.hf import calibrate as calibrate_module
    monkeypatch.setattr(calibrate_module, "fit_gate", fit_gate)
    target, aligned = tiny_model_dir("llama", seed=0), tiny_model_dir("llama", seed=1)
    logs = []
    pack = calibrate(target, HARMFUL, HARMLESS, aligned, seed=0, batch_size=5, gate="pooled", ssv="prompt",
                     candidates=[Candidate((1, 2), 2, True, 0.01)], log=logs.append)
    meta = pack.meta["gate"]
    assert meta["pooled"]["kept"] == ("pooled" if keep else "linear")
    assert any(line.startswith("pooled gate: selection key") for line in logs)
    if not keep:
        assert pack.gate_max_weight is None and meta["version"] == 2 and meta["fit"] == "logistic-l2"
        assert pack.meta["recommended"]["gate"] == "linear"
        return
    assert meta["version"] == 3 and meta["fit"] == "logistic-l2+max" and pack.meta["recommended"]["gate"] == "pooled"
    assert pack.gate_weight.shape == pack.gate_max_weight.shape == (2, 64)
    assert pack.gate_max_weight.dtype == np.float32 and np.abs(pack.gate_max_weight).max() > 0
    gate, report = captured["result"]
    prompts = HARMFUL + HARMLESS
    units = _independent_units(target, prompts, (1, 2))
    scores = []
    for p in units:  # the operator's score from the pack's tensors and bias
        score = meta["bias"]
        for row, l in enumerate(meta["layers"]):
            score += p[row, -meta["tokens"]:].mean(axis=0) @ pack.gate_weight[row]
            score += (p[row] @ pack.gate_max_weight[row]).max()
        scores.append(score)
    scores = np.array(scores)
    labels = np.array([1] * len(HARMFUL) + [0] * len(HARMLESS))
    classes = np.array(["harmful"] * len(HARMFUL) + ["harmless"] * len(HARMLESS))
    sources = np.array(["harmful"] * len(HARMFUL) + ["harmless"] * len(HARMLESS))
    held = _negative_holdout(classes, sources, 0.25, 0)
    assert held.any() and not (held & (labels == 1)).any()
    np.testing.assert_allclose(scores[held], report.scores["harmless:harmless"], atol=5e-3)
