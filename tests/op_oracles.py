"""Numpy oracles of the two steering operators, written from the contract (docs/architecture.md §5 and §5.1,
docs/contract.md), as plain loops with float64 sums. Every test that checks an implementation of SteerGate or
SteerShift (the ONNX functions and their inline form, the C++ reference, the CUDA kernels, the PyTorch reference,
the runtimes) compares it with these, never with a second copy of its own code.
"""

from __future__ import annotations

import math

import numpy as np

NORM_EPS = 1e-6  # docs/contract.md: n(x) = x / max(||x||, NORM_EPS)


def last_valid_position(mask_row: np.ndarray, S: int) -> int:
    """Version 1's ``last_b``: the last t with mask 1, mapped into this call's S positions and clamped; S-1 if none."""
    T = len(mask_row)
    ones = [t for t in range(T) if mask_row[t] == 1]
    if not ones:
        return S - 1
    return min(max(ones[-1] - (T - S), 0), S - 1)


def selected_positions(mask_row: np.ndarray, S: int, tokens: int) -> list[int]:
    """Version 2's pooled positions: the last ``tokens`` positions s of this call whose mask[T-S+s] is 1; when the
    call has none, version 1's ``last_b`` alone."""
    T = len(mask_row)
    valid = [s for s in range(S) if mask_row[T - S + s] == 1]
    return valid[-tokens:] if valid else [last_valid_position(mask_row, S)]


def decide(gate_in: float, score: float) -> float:
    """gate_in if gate_in >= 0; else 1 if the score is > 0 or not finite (a non-finite score steers), else 0."""
    if gate_in >= 0:
        return float(gate_in)
    return 1.0 if (not math.isfinite(score) or score > 0) else 0.0


def score_skipped(gate_in: float, T: int, S: int) -> bool:
    """The score at decode (docs/contract.md, issue 20): on a call with a past (T > S) a row whose gate_in >= 0 is
    not scored: its gate is gate_in and its score 0. A NaN gate_in is not >= 0."""
    return T > S and gate_in >= 0


def steer_gate_v1(hidden, mask, gate_in, direction, bias):
    """(gate [B], score [B]) float32 of SteerGate version 1."""
    B, S, _ = hidden.shape
    gate, score = np.zeros(B, np.float32), np.zeros(B, np.float32)
    for b in range(B):
        if score_skipped(float(gate_in[b]), mask.shape[1], S):
            gate[b], score[b] = gate_in[b], 0.0
            continue
        row = hidden[b, last_valid_position(mask[b], S)].astype(np.float64)
        score[b] = np.float32(float(row @ np.asarray(direction, np.float64)) + float(bias))
        gate[b] = decide(float(gate_in[b]), float(score[b]))
    return gate, score


def steer_gate_v2(hidden, mask, gate_in, score_in, weight, bias, tokens: int, normalize: bool):
    """(gate [B], score [B]) float32 of SteerGate version 2:
    ``score = score_in + mean_{s in sel} n(h[b,s]) . weight + bias``."""
    B, S, _ = hidden.shape
    w = np.asarray(weight, np.float64)
    gate, score = np.zeros(B, np.float32), np.zeros(B, np.float32)
    for b in range(B):
        if score_skipped(float(gate_in[b]), mask.shape[1], S):
            gate[b], score[b] = gate_in[b], 0.0
            continue
        positions = selected_positions(mask[b], S, tokens)
        total = 0.0
        for s in positions:
            x = hidden[b, s].astype(np.float64)
            value = float(x @ w)
            if normalize:
                value /= max(math.sqrt(float(x @ x)), NORM_EPS)
            total += value
        score[b] = np.float32(float(score_in[b]) + total / len(positions) + float(bias))
        gate[b] = decide(float(gate_in[b]), float(score[b]))
    return gate, score


def max_positions(mask_row: np.ndarray, S: int) -> list[int]:
    """Version 3's max positions P_b: every position s of this call whose mask[T-S+s] is 1; when the call has none,
    version 1's ``last_b`` alone."""
    T = len(mask_row)
    valid = [s for s in range(S) if mask_row[T - S + s] == 1]
    return valid or [last_valid_position(mask_row, S)]


def _term(x: np.ndarray, w: np.ndarray, normalize: bool) -> float:
    value = float(x @ w)
    if normalize:
        value /= max(math.sqrt(float(x @ x)), NORM_EPS)
    return value


def steer_gate_v3(hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens: int, normalize: bool):
    """(gate [B], score [B]) float32 of SteerGate version 3 (issue 18):
    ``score = score_in + mean_{s in sel} n(h[b,s]) . weight + max_{s in P} n(h[b,s]) . max_weight + bias``; the
    max is NaN when any of its terms is."""
    B, S, _ = hidden.shape
    w, m = np.asarray(weight, np.float64), np.asarray(max_weight, np.float64)
    gate, score = np.zeros(B, np.float32), np.zeros(B, np.float32)
    for b in range(B):
        if score_skipped(float(gate_in[b]), mask.shape[1], S):
            gate[b], score[b] = gate_in[b], 0.0
            continue
        pooled = selected_positions(mask[b], S, tokens)
        feature = sum(_term(hidden[b, s].astype(np.float64), w, normalize) for s in pooled) / len(pooled)
        terms = [_term(hidden[b, s].astype(np.float64), m, normalize) for s in max_positions(mask[b], S)]
        top = math.nan if any(math.isnan(t) for t in terms) else max(terms)
        score[b] = np.float32(float(score_in[b]) + feature + top + float(bias))
        gate[b] = decide(float(gate_in[b]), float(score[b]))
    return gate, score


def steer_shift(hidden, gate, vector):
    """``hidden + gate[b] * vector`` in float32, cast back; gate-0 rows come back unchanged."""
    out = hidden.astype(np.float32) + np.asarray(gate, np.float32)[:, None, None] * np.asarray(vector, np.float32)
    out = out.astype(hidden.dtype)
    zero = np.asarray(gate) == 0
    out[zero] = hidden[zero]
    return out


def steer_shift_norm(hidden, gate, vector):
    """SteerShift version 2 ("norm"): per position ``n · y / max(‖y‖, 1e-6)`` with ``y = h + gate[b] * vector``
    and ``n = ‖h‖``, in float64 from the float32 values, cast to hidden's dtype; gate-0 rows are hidden itself."""
    B, S, _ = hidden.shape
    v = np.asarray(vector, np.float64)
    out = np.empty_like(hidden)
    for b in range(B):
        g = float(np.float32(gate[b]))
        for s in range(S):
            h = hidden[b, s].astype(np.float32).astype(np.float64)
            if g == 0.0:
                out[b, s] = hidden[b, s]
                continue
            y = h + g * v
            norm_before = math.sqrt(float(h @ h))
            norm_after = max(math.sqrt(float(y @ y)), NORM_EPS)
            out[b, s] = (y * (norm_before / norm_after)).astype(np.float32).astype(hidden.dtype)
    return out


def multi_layer_score(hiddens: dict, mask, gate_in, weights: dict, bias, tokens: int, normalize: bool):
    """The §5.1 gate over several layers, chained as the export chains SteerGate version 2 nodes: the first layer's
    score_in is 0, each node adds its layer's term, the last one adds the bias and decides."""
    layers = sorted(hiddens)
    B = next(iter(hiddens.values())).shape[0]
    score = np.zeros(B, np.float32)
    gate = None
    for i, layer in enumerate(layers):
        gate, score = steer_gate_v2(hiddens[layer], mask, gate_in, score, weights[layer],
                                    bias if i == len(layers) - 1 else 0.0, tokens, normalize)
    return gate, score


def multi_layer_score_v3(hiddens: dict, mask, gate_in, weights: dict, max_weights: dict, bias, tokens: int,
                         normalize: bool):
    """Issue 18's gate over several layers, chained like :func:`multi_layer_score` with SteerGate version 3 nodes."""
    layers = sorted(hiddens)
    B = next(iter(hiddens.values())).shape[0]
    score = np.zeros(B, np.float32)
    gate = None
    for i, layer in enumerate(layers):
        gate, score = steer_gate_v3(hiddens[layer], mask, gate_in, score, weights[layer], max_weights[layer],
                                    bias if i == len(layers) - 1 else 0.0, tokens, normalize)
    return gate, score
