"""Fitting the linear gate of docs/architecture.md §5.1 (issue 10): ``score = Σ_{l∈G} w_l·f_l + b``.

``f_l`` pools the residual of layer ``l`` over the last ``K`` prompt tokens (the chat template's generation-prompt
tokens), each unit-normalised when ``normalize``. The weights come from L2-regularised logistic regression on the
standardised features, with every class and, within it, every source weighted equally (so a large source does not
decide the direction); the standardisation is folded into ``w_l`` and ``b``.

- **Selection.** ``G``, ``K`` and the regularisation are chosen by leave-one-out validation over groups: each
  calibration harmful source in turn is held out of training (with its rewrites), and so is each rewrite family (its
  rewritten prompts of both labels), and the candidate is scored by its TPR on the held-out positives at the
  operating threshold; the candidate with the best mean of its average and its worst fold wins
  (``selection_key``). Wrapped jailbreaks always stay in training: a jailbreak template is a rewrite the gate must
  have seen the like of.
- **Threshold (Neyman-Pearson).** A share of every harmless source is held out of the final fit; the bias is set so
  that the gate fires on at most ``max_fpr`` of the held-out generic instructions and at most ``max_fpr_borderline``
  of the held-out borderline-benign prompts (rule ``budgets``). Rule ``generic`` (the default) binds only ``max_fpr`` on the plain
  held-out generic instructions (their rewrites apart) and reports the other classes: XSTest's contrast prompts and
  the rewritten negatives are harder than what users send, and the ``budgets`` rule spends the generic budget on
  them (docs/calibration.md, the gate frontier study).

Torch-free: numpy and scikit-learn on the features that ``hf.calibrate`` collected.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from aligner_runtime.contract import GateConfig
from aligner_runtime.errors import AlignerError

NEGATIVE_CLASSES = ("harmless", "borderline")
NORM_EPS = 1e-6
DEFAULT_C = 0.01  # logistic regression's inverse L2 strength on standardised features (docs/calibration.md)


@dataclass(frozen=True)
class Candidate:
    layers: tuple[int, ...]
    tokens: int
    normalize: bool
    C: float

    def describe(self) -> str:
        return f"G={list(self.layers)} K={self.tokens} {'n' if self.normalize else 'raw'} C={self.C:g}"


@dataclass
class Features:
    """Per prompt: the last ``k_max`` positions of the residual at the candidate layers, ``[N, len(layers), k_max,
    H]`` (float16 to bound memory), with labels, classes and sources."""

    tails: np.ndarray
    layers: tuple[int, ...]
    labels: np.ndarray
    classes: np.ndarray
    sources: np.ndarray
    rewrites: np.ndarray | None = None  # the rewrite family of each prompt, "" for none

    def pooled(self, layers, tokens: int, normalize: bool, rows=None) -> np.ndarray:
        """``[N, len(layers) * H]``: for each layer the mean of the (normalised) last ``tokens`` positions."""
        rows = slice(None) if rows is None else rows
        parts = []
        for layer in layers:
            x = np.asarray(self.tails[rows, self.layers.index(layer), -tokens:, :], dtype=np.float32)
            if normalize:
                x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)
            parts.append(x.mean(axis=1))
        return np.concatenate(parts, axis=1)


@dataclass
class Fit:
    weights: np.ndarray  # [len(layers) * H], standardisation folded in
    bias: float  # before the threshold
    mean: np.ndarray
    scale: np.ndarray

    def score(self, X: np.ndarray) -> np.ndarray:
        return X.astype(np.float64) @ self.weights.astype(np.float64) + self.bias


@dataclass
class GateReport:
    candidate: Candidate
    threshold: float
    loso: list[dict] = field(default_factory=list)  # one entry per candidate: per-fold TPRs
    heldout: dict = field(default_factory=dict)  # the final gate on the held-out calibration negatives and positives
    scores: dict = field(default_factory=dict)  # held-out scores per (class, source), for the report's ROC


def sample_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Each class weighs the same in total, and within a class every source weighs the same."""
    weights = np.zeros(len(labels))
    for label in (0, 1):
        in_class = labels == label
        names = np.unique(sources[in_class])
        for name in names:
            rows = in_class & (sources == name)
            weights[rows] = 1.0 / (len(names) * rows.sum())
    return weights / weights.mean()


def fit_linear(X: np.ndarray, labels: np.ndarray, sources: np.ndarray, C: float) -> Fit:
    # deferred: scikit-learn, loaded only when calibration fits a gate
    from sklearn.exceptions import ConvergenceWarning
    # deferred: scikit-learn (as above)
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.maximum(scale, 1e-2 * float(np.median(scale)) + 1e-12)  # a constant dimension must not blow up
    Z = (X - mean) / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=C, max_iter=3000).fit(Z, labels, sample_weight=sample_weights(labels, sources))
    coef = model.coef_[0] / scale
    return Fit(weights=coef.astype(np.float32), bias=float(model.intercept_[0] - coef @ mean), mean=mean,
               scale=scale)


THRESHOLD_RULES = ("generic", "budgets")


def np_threshold(scores: np.ndarray, classes: np.ndarray, max_fpr: float, max_fpr_borderline: float,
                 rule: str = "budgets", rewritten: np.ndarray | None = None) -> float:
    """The smallest threshold that keeps each negative class within its false-positive budget (``budgets``), or the
    plain generic instructions alone within ``max_fpr`` (``generic``; ``rewritten`` marks the rewrites)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule == "generic":
        plain = (classes == "harmless") & (~rewritten if rewritten is not None else True)
        if plain.any():
            return np_threshold(scores[plain], classes[plain], max_fpr, max_fpr_borderline)
    threshold = -np.inf
    for cls, budget in (("harmless", max_fpr), ("borderline", max_fpr_borderline)):
        values = np.sort(scores[classes == cls])[::-1]
        if values.size:
            allowed = int(np.floor(budget * values.size))
            threshold = max(threshold, float(values[min(allowed, values.size - 1)]))
    return threshold


def _negative_holdout(classes: np.ndarray, sources: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A boolean mask: ``share`` of every negative source, chosen at random, held out for the threshold."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(classes), bool)
    for cls in NEGATIVE_CLASSES:
        for name in np.unique(sources[classes == cls]):
            rows = np.flatnonzero((classes == cls) & (sources == name))
            count = int(round(share * rows.size)) if rows.size > 1 else 0
            held[rng.choice(rows, size=count, replace=False)] = True
    return held


def default_candidates(num_layers: int) -> list[Candidate]:
    """Three layer sets (every 3rd layer from a third of the way up, with the last layer; its upper six; its upper
    four), each pooling the last token or the last four, at one regularisation: six candidates, so that the
    leave-one-source-out search stays within minutes on two cores (docs/calibration.md gives the wider grid it was
    drawn from)."""
    top = num_layers - 1
    every_third = tuple(range(top - 2, max(num_layers // 3 - 2, -1), -3))[::-1]
    wide = tuple(sorted({*every_third, top}))
    sets = {wide, every_third[-6:], every_third[-4:]}
    return [Candidate(s, k, True, DEFAULT_C) for s in sorted(sets, key=lambda s: (-len(s), s)) for k in (1, 4)
            if s and all(0 <= l < num_layers for l in s)]


def selection_key(result: dict) -> float:
    """A candidate's merit: the mean of its average fold and its worst fold. A gate is judged by the source or
    rewrite it does worst on (the bypass target is a worst case), and the mean keeps one odd fold from deciding."""
    return 0.5 * (result["mean_tpr"] + result["min_tpr"])


def _folds(features: Features, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, test rows, rows excluded from training besides the test rows)`` for every fold: each original harmful
    source, each rewrite family; with a single harmful source and no rewrites, a random quarter of it."""
    labels, sources = features.labels, features.sources
    rewrites = features.rewrites if features.rewrites is not None else np.full(len(labels), "")
    nothing = np.zeros(len(labels), bool)
    folds = [(f"source {name}", (labels == 1) & (sources == name), nothing)
             for name in np.unique(sources[labels == 1]) if not str(name).startswith("wrapped:")]
    for family in np.unique(rewrites[rewrites != ""]):
        if family == "wrapped":
            continue
        in_family = rewrites == family
        if (in_family & (labels == 1)).any():
            folds.append((f"rewrite {family}", in_family & (labels == 1), in_family & (labels == 0)))
    if len(folds) < 2:
        quarter = (labels == 1) & (np.random.default_rng(seed + 1).random(len(labels)) < 0.25)
        folds = [("random quarter", quarter, nothing)]
    return folds


def fit_gate(features: Features, candidates: list[Candidate], max_fpr: float, max_fpr_borderline: float,
             holdout_share: float = 0.25, seed: int = 0, progress=None,
             threshold_rule: str = "generic") -> tuple[GateConfig, GateReport]:
    """Selects a candidate by leave-one-source-out validation, fits it, and sets the threshold (module docstring)."""
    labels, classes, sources = features.labels, features.classes, features.sources
    if threshold_rule not in THRESHOLD_RULES:
        raise AlignerError(f"--threshold-rule must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
    rewritten = (features.rewrites != "") if features.rewrites is not None else np.zeros(len(labels), bool)
    if (labels == 1).sum() < 8 or (labels == 0).sum() < 8:
        raise AlignerError("the linear gate needs at least 8 harmful and 8 harmless calibration prompts")
    held = _negative_holdout(classes, sources, holdout_share, seed)
    if not held.any():
        raise AlignerError("no harmless prompt could be held out to set the gate's threshold")
    folds = _folds(features, seed)
    results = []
    for i, candidate in enumerate(candidates):
        X = features.pooled(candidate.layers, candidate.tokens, candidate.normalize)
        scored = []
        for name, test, excluded in folds:
            train = ~test & ~excluded & ~held
            fit = fit_linear(X[train], labels[train], sources[train], candidate.C)
            rows = held & ~excluded
            threshold = np_threshold(fit.score(X[rows]), classes[rows], max_fpr, max_fpr_borderline, threshold_rule,
                                     rewritten[rows])
            scored.append({"held_out": name, "count": int(test.sum()),
                           "tpr": float((fit.score(X[test]) > threshold).mean())})
        folds_result = scored
        tprs = [f["tpr"] for f in folds_result]
        results.append({"candidate": candidate.describe(), "mean_tpr": float(np.mean(tprs)),
                        "min_tpr": float(np.min(tprs)), "folds": folds_result})
        if progress is not None:
            progress(i + 1, len(candidates), candidate, results[-1])
    best = max(range(len(candidates)), key=lambda i: (round(selection_key(results[i]), 4), results[i]["mean_tpr"]))
    chosen = candidates[best]
    X = features.pooled(chosen.layers, chosen.tokens, chosen.normalize)
    fit = fit_linear(X[~held], labels[~held], sources[~held], chosen.C)
    held_scores = fit.score(X[held])
    threshold = np_threshold(held_scores, classes[held], max_fpr, max_fpr_borderline, threshold_rule,
                             rewritten[held])
    hidden = features.tails.shape[-1]
    weights = {layer: fit.weights[i * hidden:(i + 1) * hidden] for i, layer in enumerate(chosen.layers)}
    gate = GateConfig(layers=chosen.layers, weights=weights, bias=fit.bias - threshold, tokens=chosen.tokens,
                      normalize=chosen.normalize, version=2, rule="linear")
    report = GateReport(candidate=chosen, threshold=threshold, loso=results)
    for cls in NEGATIVE_CLASSES:
        rows = held & (classes == cls)
        if rows.any():
            report.heldout[f"fpr_{cls}"] = float((held_scores[classes[held] == cls] > threshold).mean())
            report.heldout[f"count_{cls}"] = int(rows.sum())
    rewritten_held = rewritten[held] & (labels[held] == 0)
    if rewritten_held.any():
        report.heldout["fpr_rewritten"] = float((held_scores[rewritten_held] > threshold).mean())
    for name in np.unique(sources[held]):
        rows = held & (sources == name)
        report.scores[f"{classes[rows][0]}:{name}"] = (fit.score(X[rows]) - threshold).tolist()
    report.heldout["loso_mean_tpr"] = results[best]["mean_tpr"]
    report.heldout["loso_min_tpr"] = results[best]["min_tpr"]
    return gate, report
