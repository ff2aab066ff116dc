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

- **Pooled gate** (``--gate pooled``, SteerGate version 3, issue 18): the selected candidate again with a max over
  every prompt token per layer (:func:`fit_pooled` on :class:`TokenFeatures`), kept only where its folds give a
  higher ``selection_key`` than the linear gate's (docs/calibration.md "The pooled gate").

Torch-free: numpy and scikit-learn on the features that ``hf.calibrate`` collected.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from aligner_runtime.contract import GateConfig
from aligner_runtime.errors import AlignerError

from aligner_export.gate_tokens import (MAX_TOKEN_BYTES, POOLED_DIM, POOLED_SAMPLE_TOKENS, TokenBasis,  # noqa: F401
                                        TokenCollector, TokenFeatures, fit_basis, token_feature_bytes)

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
    pooled: dict | None = None  # with token features: the pooled gate's folds against the linear gate's


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


OBJECTIVES = ("logistic", "operating-point")
DEFAULT_OBJECTIVE = "logistic"  # operating-point lost plain recall on the held-out sources (docs/calibration.md)
HARD_SHARE = 0.20  # operating-point objective: the training negatives' top share that marks the operating region
HARD_WEIGHT = 5.0  # ... and the weight of every prompt in it (negatives above the cut, positives below it)


def hard_weights(scores: np.ndarray, labels: np.ndarray, share: float = HARD_SHARE,
                 weight: float = HARD_WEIGHT) -> np.ndarray:
    """The operating-point objective's extra weights: the negatives that score in the top ``share`` of the negatives
    (where a threshold at a small FPR budget sits) and the positives that score below them get ``weight``, the rest
    1. A reweighted logistic loss, a surrogate of the partial AUC at low FPR."""
    negative = labels == 0
    cut = float(np.quantile(scores[negative], 1.0 - share)) if negative.any() else -np.inf
    extra = np.ones(len(labels))
    extra[negative & (scores >= cut)] = weight
    extra[~negative & (scores <= cut)] = weight
    return extra


def fit_linear(X: np.ndarray, labels: np.ndarray, sources: np.ndarray, C: float,
               objective: str = "logistic") -> Fit:
    """L2-regularised logistic regression on the standardised features, every class and source weighted equally
    (:func:`sample_weights`). ``objective="operating-point"`` fits again with the prompts of the operating region
    weighted up (:func:`hard_weights` on the first fit's scores): the loss spends itself where the threshold sits."""
    # deferred: scikit-learn, loaded only when calibration fits a gate
    from sklearn.exceptions import ConvergenceWarning
    # deferred: scikit-learn (as above)
    from sklearn.linear_model import LogisticRegression

    if objective not in OBJECTIVES:
        raise AlignerError(f"--gate-objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.maximum(scale, 1e-2 * float(np.median(scale)) + 1e-12)  # a constant dimension must not blow up
    Z = (X - mean) / scale
    weights = sample_weights(labels, sources)
    model = None
    for _ in range(1 if objective == "logistic" else 2):
        if model is not None:  # the second fit: the operating region (on the first fit's scores) weighted up
            extra = hard_weights(model.decision_function(Z), labels)
            weights = weights * extra / np.mean(extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=C, max_iter=3000).fit(Z, labels, sample_weight=weights)
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
             threshold_rule: str = "generic", tokens: TokenFeatures | None = None,
             pooled_steps: tuple[int, int] | None = None, objective: str = DEFAULT_OBJECTIVE,
             log=lambda *_: None) -> tuple[GateConfig, GateReport]:
    """Selects a candidate by leave-one-source-out validation, fits it, and sets the threshold (module docstring).

    With ``tokens`` (every prompt token at the candidate layers, :class:`TokenCollector`) the selected candidate is
    fitted again with the max term (:func:`fit_pooled`, warm-started from each fold's linear gate) on the same folds,
    and the pooled gate (version 3) replaces the linear one only where its ``selection_key`` is higher.
    ``objective`` is the linear fits' loss (:func:`fit_linear`), in the folds and in the final fit alike."""
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
    results, fold_fits = [], []
    for i, candidate in enumerate(candidates):
        X = features.pooled(candidate.layers, candidate.tokens, candidate.normalize)
        scored = []
        fold_fits.append([])
        for name, test, excluded in folds:
            train = ~test & ~excluded & ~held
            fit = fit_linear(X[train], labels[train], sources[train], candidate.C, objective)
            fold_fits[-1].append(fit)
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
    fit = fit_linear(X[~held], labels[~held], sources[~held], chosen.C, objective)
    held_scores = fit.score(X[held])
    threshold = np_threshold(held_scores, classes[held], max_fpr, max_fpr_borderline, threshold_rule,
                             rewritten[held])
    hidden = features.tails.shape[-1]
    weights = {layer: fit.weights[i * hidden:(i + 1) * hidden] for i, layer in enumerate(chosen.layers)}
    gate = GateConfig(layers=chosen.layers, weights=weights, bias=fit.bias - threshold, tokens=chosen.tokens,
                      normalize=chosen.normalize, version=2, rule="linear")
    report = GateReport(candidate=chosen, threshold=threshold, loso=results)
    score_of = lambda rows: fit.score(X[rows])  # noqa: E731
    if tokens is not None:
        pooled = _pooled_gate(features, tokens, chosen, X, folds, fold_fits[best], results[best], fit, held,
                              rewritten, max_fpr, max_fpr_borderline, threshold_rule,
                              pooled_steps or (POOLED_FOLD_STEPS, POOLED_STEPS), log)
        report.pooled = pooled["report"]
        if pooled["gate"] is not None:
            gate, threshold, held_scores = pooled["gate"], pooled["threshold"], pooled["held_scores"]
            report.threshold = threshold
            score_of = pooled["score_of"]
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
        report.scores[f"{classes[rows][0]}:{name}"] = (score_of(rows) - threshold).tolist()
    chosen_result = results[best] if gate.version != POOLED_VERSION else report.pooled
    report.heldout["loso_mean_tpr"] = chosen_result["mean_tpr"]
    report.heldout["loso_min_tpr"] = chosen_result["min_tpr"]
    return gate, report


def _pooled_gate(features, tokens, chosen, X, folds, linear_fits, linear_result, final_linear, held, rewritten,
                 max_fpr, max_fpr_borderline, threshold_rule, steps, log) -> dict:
    """The selected candidate with the max term, on the linear gate's folds; the final pooled gate where its
    ``selection_key`` beats the linear gate's (``gate`` None otherwise)."""
    labels, classes, sources = features.labels, features.classes, features.sources
    if tokens.count != len(labels) or any(l not in tokens.layers for l in chosen.layers):
        raise AlignerError(f"the token features cover layers {list(tokens.layers)} of {tokens.count} prompts; the "
                           f"gate reads layers {list(chosen.layers)} of {len(labels)}")
    hidden = features.tails.shape[-1]
    start = time.perf_counter()

    def direction(fit):
        return {layer: fit.weights[i * hidden:(i + 1) * hidden] for i, layer in enumerate(chosen.layers)}

    scored = []
    for (name, test, excluded), fit in zip(folds, linear_fits):
        train = ~test & ~excluded & ~held
        linear = fit.score(X)
        pooled = fit_pooled(linear, tokens, chosen.layers, labels, sources, train, chosen.C, steps[0],
                            direction(fit))
        score = pooled.score(linear, tokens)
        rows = held & ~excluded
        threshold = np_threshold(score[rows], classes[rows], max_fpr, max_fpr_borderline, threshold_rule,
                                 rewritten[rows])
        scored.append({"held_out": name, "count": int(test.sum()), "tpr": float((score[test] > threshold).mean())})
    tprs = [f["tpr"] for f in scored]
    result = {"candidate": chosen.describe() + " +max", "mean_tpr": float(np.mean(tprs)),
              "min_tpr": float(np.min(tprs)), "folds": scored}
    key, linear_key = selection_key(result), selection_key(linear_result)
    keep = round(key, 4) > round(linear_key, 4)
    report = {**result, "selection_key": key, "linear_selection_key": linear_key,
              "linear_mean_tpr": linear_result["mean_tpr"], "linear_min_tpr": linear_result["min_tpr"],
              "kept": POOLED_KIND if keep else "linear", "fold_steps": steps[0], "steps": steps[1],
              "dim": int(tokens.coords[tokens.layers[0]].shape[1])}
    out = {"report": report, "gate": None}
    if keep:
        linear = final_linear.score(X)
        pooled = fit_pooled(linear, tokens, chosen.layers, labels, sources, ~held, chosen.C, steps[1],
                            direction(final_linear))
        score = pooled.score(linear, tokens)
        threshold = np_threshold(score[held], classes[held], max_fpr, max_fpr_borderline, threshold_rule,
                                 rewritten[held])
        out.update(gate=pooled_gate_config(final_linear, pooled, tokens, chosen, threshold, hidden),
                   threshold=threshold, held_scores=score[held], score_of=lambda rows: score[rows])
    report["seconds"] = round(time.perf_counter() - start, 1)
    log(f"pooled gate: selection key {key:.4f} vs linear {linear_key:.4f}; keeping "
        f"{POOLED_KIND if keep else 'linear'} (leave-one-source-out TPR mean {result['mean_tpr']:.3f}, worst "
        f"{result['min_tpr']:.3f}; {report['seconds']:.1f}s)")
    return out


# --- the pooled gate (SteerGate version 3, issue 18) ------------------------------------------------------------------
# ``score = Σ_{l∈G} [w_l·mean_K n(h_l) + max_s u_l·n(h_l[s])] + b`` over every valid prompt position ``s``. The max
# term reads the whole prompt, so calibration keeps every prompt token at the candidate gate layers: as whitened
# coordinates on a per-layer principal basis of the normalised residual (``POOLED_DIM`` dimensions, float16), which the
# fit then folds back into a plain ``[H]`` vector ``u_l`` (``u_l = basisᵀ·(u/scale)``, the basis mean into the bias).
POOLED_KIND = "pooled"  # the pack name of SteerGate version 3's kind (contract.GATE_KINDS[3])
POOLED_VERSION = 3
POOLED_STEPS, POOLED_FOLD_STEPS = 150, 60  # Adam steps of the final fit and of each validation fold's
POOLED_LR = 0.05
ACTIVE_TOKENS, REFRESH_EVERY = 8, 30  # the max is taken over each prompt's top tokens, re-ranked every 30 steps
POOLED_INIT_NORM = 0.1  # |u| per layer at the start, along the linear gate's direction of that layer


@dataclass
class PooledFit:
    """``score = scale·linear + Σ_l max_s u_l·x_s + bias`` with ``linear`` the linear gate's score (its bias
    included) and ``u_l`` on the whitened coordinates of layer ``l``."""

    scale: float
    u: np.ndarray  # [len(G), D]
    bias: float
    layers: tuple[int, ...]

    def score(self, linear: np.ndarray, tokens: TokenFeatures, rows=None) -> np.ndarray:
        total = self.scale * np.asarray(linear, np.float64) + self.bias
        for j, layer in enumerate(self.layers):
            total = total + tokens.segment_max(layer, self.u[j]).astype(np.float64)
        return total if rows is None else total[rows]


def _init_u(tokens: TokenFeatures, layers, linear_weights: dict | None) -> np.ndarray:
    """Each layer's ``u`` along the linear gate's direction of that layer (in whitened coordinates): at ``u = 0`` every
    token ties, and the one the max then picks (the template's first) is the same in every prompt, so its gradient
    vanishes."""
    u = np.zeros((len(layers), tokens.coords[layers[0]].shape[1]), np.float64)
    for j, layer in enumerate(layers):
        basis = tokens.bases[layer]
        v = basis.scale * (basis.basis @ linear_weights[layer]) if linear_weights is not None else None
        if v is None or not np.linalg.norm(v) > 0:
            v = np.random.default_rng(j).standard_normal(u.shape[1])
        u[j] = POOLED_INIT_NORM * v / np.linalg.norm(v)
    return u


def fit_pooled(linear: np.ndarray, tokens: TokenFeatures, layers, labels: np.ndarray, sources: np.ndarray,
               train: np.ndarray, C: float, steps: int = POOLED_STEPS, linear_weights: dict | None = None,
               lr: float = POOLED_LR) -> PooledFit:
    """The max term fitted on top of a linear gate (``linear``: its scores ``[N]``, bias included), by Adam on the
    class- and source-balanced logistic loss with the linear gate's L2 strength (scikit-learn's ``C``, per training
    prompt) on ``u``. The linear gate's direction stays; its scale and the bias are fitted with ``u``.

    The max over a prompt's tokens is taken over its ``ACTIVE_TOKENS`` best tokens, re-ranked over all of them every
    ``REFRESH_EVERY`` steps; the returned fit is scored exactly (:meth:`PooledFit.score`)."""
    layers = tuple(layers)
    rows = np.flatnonzero(train)
    y = labels[rows].astype(np.float64)
    sw = sample_weights(labels[rows], sources[rows]) / len(rows)
    lin = np.asarray(linear, np.float64)[rows]
    l2 = 1.0 / (2.0 * C * len(rows))
    u = _init_u(tokens, layers, linear_weights)
    params = [np.array([1.0]), u, np.array([0.0])]  # scale, u, bias
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    active = None
    for step in range(steps):
        if step % REFRESH_EVERY == 0:  # every prompt's best tokens under the current u, in float32 coordinates
            active = []
            for j, layer in enumerate(layers):
                idx = tokens.top_tokens(layer, params[1][j], ACTIVE_TOKENS)[rows]
                active.append(tokens.coords[layer][idx].astype(np.float32))  # [n, k, D]
        scale, u, bias = params[0][0], params[1], params[2][0]
        score = scale * lin + bias
        picked = []
        for j in range(len(layers)):
            values = active[j] @ u[j].astype(np.float32)  # [n, k]
            best = values.argmax(axis=1)
            score = score + values[np.arange(len(rows)), best]
            picked.append(active[j][np.arange(len(rows)), best])  # [n, D]
        g = sw * (1.0 / (1.0 + np.exp(-score)) - y)  # d loss / d score
        grads = [np.array([g @ lin]), np.stack([g @ p for p in picked]) + 2 * l2 * u, np.array([g.sum()])]
        for i, grad in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * grad
            v[i] = beta2 * v[i] + (1 - beta2) * grad ** 2
            m_hat, v_hat = m[i] / (1 - beta1 ** (step + 1)), v[i] / (1 - beta2 ** (step + 1))
            params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return PooledFit(scale=float(params[0][0]), u=params[1].astype(np.float32), bias=float(params[2][0]),
                     layers=layers)


def pooled_gate_config(linear: Fit, pooled: PooledFit, tokens: TokenFeatures, candidate: Candidate, threshold: float,
                       hidden: int) -> GateConfig:
    """The version-3 gate whose score (the operator's: plain ``[H]`` vectors on the normalised residual) equals the
    fit's score minus ``threshold``: ``w_l = scale·w_lin,l``, ``u_l = basisᵀ·(u/scale_pca)``, the bias gathering the
    linear bias, the fit's bias and the basis means."""
    weights, max_weights, bias = {}, {}, pooled.scale * linear.bias + pooled.bias - threshold
    for i, layer in enumerate(candidate.layers):
        weights[layer] = pooled.scale * linear.weights[i * hidden:(i + 1) * hidden]
        u_h, constant = tokens.bases[layer].to_residual(pooled.u[pooled.layers.index(layer)])
        max_weights[layer] = u_h.astype(np.float32)
        bias += constant
    return GateConfig(layers=candidate.layers, weights=weights, max_weights=max_weights, bias=bias,
                      tokens=candidate.tokens, normalize=candidate.normalize, version=POOLED_VERSION, rule="linear")
