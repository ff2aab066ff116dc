"""The two steering operators as ONNX model-local functions (docs/architecture.md §5, §5.1, docs/contract.md).

``SteerGate`` (version 1, version 2 for the multi-layer pooled gate, or version 3, which adds a max over the prompt)
and ``SteerShift`` (version 1, "add", or version 2, "norm": rescaled to the norm before the shift) live in domain
``inferaligner``. Each node carries its constants as node attributes (``direction``/``bias`` for SteerGate v1,
``weight``/``bias``/``tokens``/``normalize`` for v2, those and ``max_weight`` for v3, ``vector`` for SteerShift) that
the function body reads through ``Constant(ref_attr_name=...)``, plus ``plugin_namespace`` / ``plugin_version`` so
that TensorRT can map the node to our plugin of the same name and version. The bodies use only standard ONNX ops and do their math in float32 whatever
the model's dtype: the residual is cast to float32, and SteerShift casts its result back with ``CastLike``. The
decision steers on a non-finite score (issue 14).

``inline_nodes`` expands a node into the same body as plain ops in the main graph (``--steer-impl inline``), so both
forms compute exactly the same thing.

This module imports only ``onnx`` and ``numpy``: the TensorRT helper and the tests import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner_runtime.contract import (ATTENTION_MASK, DOMAIN, GATE_KINDS, OP_TYPES, PLUGIN_ATTRIBUTES,
                                      PLUGIN_NAMESPACE, SHIFT_CONSTANT, SHIFT_MODES, STEER_GATE, STEER_SHIFT,
                                      GateConfig, gate_kind, plugin_version, shift_mode_named,
                                      shift_mode_of_version)

# Lowest standard opset the bodies are written for (GatherND batch_dims, CastLike, Unsqueeze with axes input).
MIN_OPSET = 15



def _ref_constant(output: str, attr: str, kind: str) -> onnx.NodeProto:
    """A ``Constant`` whose value is the calling node's attribute ``attr`` (``kind``: value, value_float, value_int)."""
    node = helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto()
    ref.name = kind
    ref.ref_attr_name = attr
    ref.type = {"value": onnx.AttributeProto.TENSOR, "value_float": onnx.AttributeProto.FLOAT,
                "value_int": onnx.AttributeProto.INT}[kind]
    node.attribute.append(ref)
    return node


def _i64(output: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output],
                            value=numpy_helper.from_array(np.asarray(values, dtype=np.int64), output))


def _f32_scalar(output: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output],
                            value=numpy_helper.from_array(np.asarray(value, dtype=np.float32), output))


NORM_EPS = 1e-6  # docs/contract.md: n(x) = x / max(||x||, 1e-6)


def _call_shape_nodes() -> list[onnx.NodeProto]:
    """``T`` (from ``attention_mask`` [B,T]) and ``S`` (from ``hidden`` [B,S,H]) of this call, with the constants
    ``zero``, ``one``, ``minus_one``, ``axis1`` for the rest of the body; at the function's top level (the If reads
    them from its outer scope)."""
    n = helper.make_node
    return [
        _i64("zero", 0),
        _i64("one", 1),
        _i64("minus_one", -1),
        _i64("axis1", [1]),
        # T = past + S from the mask, S from hidden.
        n("Shape", [ATTENTION_MASK], ["mask_shape"]),
        n("Gather", ["mask_shape", "one"], ["T"], axis=0),
        n("Shape", ["hidden"], ["hidden_shape"]),
        n("Gather", ["hidden_shape", "one"], ["S"], axis=0),
    ]


def _last_position_nodes(opset: int) -> list[onnx.NodeProto]:
    """``last_b`` of §5 from ``attention_mask`` [B,T] and ``hidden`` [B,S,H] (``T``, ``S`` and the constants come
    from :func:`_call_shape_nodes`); also leaves ``past``."""
    n = helper.make_node
    nodes = [
        # t*[b] = last t in [0, T) with mask 1, or -1 when the row has none.
        n("Range", ["zero", "T", "one"], ["positions"]),
        n("Equal", [ATTENTION_MASK, "one"], ["is_token"]),
        n("Where", ["is_token", "positions", "minus_one"], ["token_positions"]),
    ]
    if opset >= 18:
        nodes.append(n("ReduceMax", ["token_positions", "axis1"], ["t_last"], keepdims=0))
    else:
        nodes.append(n("ReduceMax", ["token_positions"], ["t_last"], axes=[1], keepdims=0))
    nodes += [
        # A row with no token reads position S-1 (t* = T-1).
        n("Sub", ["T", "one"], ["T_minus_one"]),
        n("Less", ["t_last", "zero"], ["no_token"]),
        n("Where", ["no_token", "T_minus_one", "t_last"], ["t_star"]),
        # last_b = clamp(t* - (T - S), 0, S - 1): the position within this call's S positions.
        n("Sub", ["T", "S"], ["past"]),
        n("Sub", ["t_star", "past"], ["s_raw"]),
        n("Sub", ["S", "one"], ["S_minus_one"]),
        n("Min", ["s_raw", "S_minus_one"], ["s_hi"]),
        n("Max", ["s_hi", "zero"], ["last_b"]),
    ]
    return nodes


def _decision_nodes() -> list[onnx.NodeProto]:
    """``gate = gate_in`` if ``gate_in >= 0``, else 1 when ``score > 0`` or not finite, else 0 (docs/contract.md);
    from ``computed_score`` to ``decided_gate`` (inside the If's then-branch)."""
    n = helper.make_node
    return [
        _f32_scalar("zero_f", 0.0),
        n("Greater", ["computed_score", "zero_f"], ["positive"]),
        n("IsNaN", ["computed_score"], ["is_nan"]),
        n("IsInf", ["computed_score"], ["is_inf"]),
        n("Or", ["is_nan", "is_inf"], ["non_finite"]),
        n("Or", ["positive", "non_finite"], ["fires"]),
        n("Cast", ["fires"], ["decided"], to=TensorProto.FLOAT),
        n("GreaterOrEqual", ["gate_in", "zero_f"], ["forced"]),
        n("Where", ["forced", "gate_in", "decided"], ["decided_gate"]),
    ]


_OUT = helper.make_tensor_value_info


def _skip_at_decode(score_nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The score is not computed at decode (docs/contract.md "The score at decode", issue 20): on a call with a past
    (``T > S``) a row whose ``gate_in >= 0`` gets ``gate = gate_in`` and ``score = 0``.

    ``score_nodes`` compute ``computed_score`` and ``decided_gate`` for every row (today's body). They run inside an
    ``If`` only when some row needs them: a prefill (``T <= S``) or a row that decides (``gate_in`` < 0 or NaN); the
    then-branch zeroes the score of the forced rows of a call with a past, so a mixed call follows the per-row rule
    too. The else-branch (every row forced at decode, what every decode step of the runtimes is) is three nodes.
    The deciding rows are counted with a ReduceSum (0 for B = 0), not found with ReduceMin(gate_in), which a NaN
    would defeat."""
    n = helper.make_node
    then_branch = helper.make_graph(
        [*score_nodes,
         n("Greater", ["T", "S"], ["has_past"]),
         n("And", ["has_past", "forced_row"], ["skipped_row"]),
         n("Where", ["skipped_row", "zero_f_in", "computed_score"], ["then_score"])],
        "score", [], [_OUT("decided_gate", TensorProto.FLOAT, None), _OUT("then_score", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [n("Identity", ["gate_in"], ["else_gate"]),
         n("Shape", ["gate_in"], ["rows_shape"]),
         # zeros, not gate_in * 0: gate_in may be infinite
         n("ConstantOfShape", ["rows_shape"], ["else_score"],
           value=numpy_helper.from_array(np.zeros(1, np.float32), "zero_score"))],
        "forced", [], [_OUT("else_gate", TensorProto.FLOAT, None), _OUT("else_score", TensorProto.FLOAT, None)])
    return [
        _f32_scalar("zero_f_in", 0.0),
        n("GreaterOrEqual", ["gate_in", "zero_f_in"], ["forced_row"]),
        n("Not", ["forced_row"], ["deciding_row"]),
        n("Cast", ["deciding_row"], ["deciding_i64"], to=TensorProto.INT64),
        n("ReduceSum", ["deciding_i64"], ["deciding_rows"], keepdims=0),
        n("Greater", ["deciding_rows", "zero"], ["any_deciding"]),
        n("LessOrEqual", ["T", "S"], ["no_past"]),
        n("Or", ["no_past", "any_deciding"], ["needs_score"]),
        n("If", ["needs_score"], ["gate", "score"], then_branch=then_branch, else_branch=else_branch),
    ]


def _steer_gate_v1_body(opset: int) -> list[onnx.NodeProto]:
    """SteerGate v1: (hidden, attention_mask, gate_in) -> (gate, score); ``score = h[b, last_b] . direction + bias``,
    not computed at decode (:func:`_skip_at_decode`)."""
    n = helper.make_node
    score = [
        *_last_position_nodes(opset),
        n("Unsqueeze", ["last_b", "axis1"], ["last_index"]),
        n("GatherND", ["hidden", "last_index"], ["last_hidden"], batch_dims=1),
        # float32 accumulation whatever the model's dtype.
        n("Cast", ["last_hidden"], ["last_hidden_f32"], to=TensorProto.FLOAT),
        n("MatMul", ["last_hidden_f32", "direction"], ["projection"]),
        n("Add", ["projection", "bias"], ["computed_score"]),
        *_decision_nodes(),
    ]
    # The attribute references stay at the function's top level (the If's branches read their outputs).
    return [
        _ref_constant("direction", "direction", "value"),
        _ref_constant("bias", "bias", "value_float"),
        *_call_shape_nodes(),
        *_skip_at_decode(score),
    ]


def _pooled_feature_nodes(opset: int) -> list[onnx.NodeProto]:
    """Version 2's ``f[b]`` (``feature``), the mean over the pooled positions of ``n(h[b,s]) . weight``; also leaves
    ``valid`` (the valid positions of this call), ``fallback`` (``last_b`` on a row with none), ``hidden_f32``,
    ``norm_floor`` and ``do_normalise`` for version 3's max term."""
    n = helper.make_node
    return [
        *_last_position_nodes(opset),
        # The valid positions of this call: mask[b, T-S+s] == 1.
        n("Unsqueeze", ["past", "zero"], ["past_1d"]),
        n("Unsqueeze", ["T", "zero"], ["T_1d"]),
        n("Slice", [ATTENTION_MASK, "past_1d", "T_1d", "axis1"], ["call_mask"]),
        n("Equal", ["call_mask", "one"], ["valid"]),
        # Pooled: valid positions with at most K valid positions at or after them (the last K).
        n("Cast", ["valid"], ["valid_i64"], to=TensorProto.INT64),
        n("CumSum", ["valid_i64", "one"], ["rank_from_end"], reverse=1),
        n("LessOrEqual", ["rank_from_end", "tokens"], ["within_k"]),
        n("And", ["valid", "within_k"], ["pooled_k"]),
        n("Cast", ["pooled_k"], ["pooled_k_f"], to=TensorProto.FLOAT),
        n("ReduceSum", ["pooled_k_f", "axis1"], ["count_k"], keepdims=0),
        # A row with no valid position in this call pools version 1's last_b alone.
        _f32_scalar("zero_f_count", 0.0),
        _f32_scalar("one_f", 1.0),
        n("Equal", ["count_k", "zero_f_count"], ["none_valid"]),
        n("Range", ["zero", "S", "one"], ["call_positions"]),
        n("Unsqueeze", ["last_b", "axis1"], ["last_b_col"]),
        n("Equal", ["call_positions", "last_b_col"], ["at_last_b"]),
        n("Unsqueeze", ["none_valid", "axis1"], ["none_valid_col"]),
        # (pooled_k is all false on such a row, so an Or selects; ORT has no bool Where.)
        n("And", ["none_valid_col", "at_last_b"], ["fallback"]),
        n("Or", ["pooled_k", "fallback"], ["pooled"]),
        n("Where", ["none_valid", "one_f", "count_k"], ["count"]),
        # Per-position terms in float32, normalised by the position's norm when asked.
        n("Cast", ["hidden"], ["hidden_f32"], to=TensorProto.FLOAT),
        n("MatMul", ["hidden_f32", "weight"], ["dots"]),
        n("Mul", ["hidden_f32", "hidden_f32"], ["squares"]),
        _i64("axis2", [2]),
        n("ReduceSum", ["squares", "axis2"], ["norm_sq"], keepdims=0),
        n("Sqrt", ["norm_sq"], ["norm"]),
        _f32_scalar("norm_eps", NORM_EPS),
        n("Max", ["norm", "norm_eps"], ["norm_floor"]),
        n("Div", ["dots", "norm_floor"], ["dots_normalised"]),
        n("Equal", ["normalize", "one"], ["do_normalise"]),
        n("Where", ["do_normalise", "dots_normalised", "dots"], ["terms"]),
        # Masked mean over the pooled positions (Where, not Mul: a NaN term outside the pool must not leak in).
        _f32_scalar("zero_f_terms", 0.0),
        n("Where", ["pooled", "terms", "zero_f_terms"], ["pooled_terms"]),
        n("ReduceSum", ["pooled_terms", "axis1"], ["total"], keepdims=0),
        n("Div", ["total", "count"], ["feature"]),
    ]


def _steer_gate_v2_body(opset: int) -> list[onnx.NodeProto]:
    """SteerGate v2: (hidden, attention_mask, gate_in, score_in) -> (gate, score);
    ``score = (score_in + mean_{pooled s} n(h[b,s]) . weight) + bias`` (docs/contract.md), not computed at decode
    (:func:`_skip_at_decode`)."""
    n = helper.make_node
    score = [
        *_pooled_feature_nodes(opset),
        n("Add", ["score_in", "feature"], ["partial"]),
        n("Add", ["partial", "bias"], ["computed_score"]),
        *_decision_nodes(),
    ]
    return [
        _ref_constant("weight", "weight", "value"),
        _ref_constant("bias", "bias", "value_float"),
        _ref_constant("tokens", "tokens", "value_int"),
        _ref_constant("normalize", "normalize", "value_int"),
        *_call_shape_nodes(),
        *_skip_at_decode(score),
    ]


def _steer_gate_v3_body(opset: int) -> list[onnx.NodeProto]:
    """SteerGate v3 (issue 18, the pooled gate): version 2's inputs and outputs;
    ``score = ((score_in + f) + m) + bias`` with ``m[b] = max over the valid positions s of this call of
    n(h[b,s]) . max_weight`` (``last_b`` alone on a row with none), NaN when any of them is NaN (docs/contract.md
    "SteerGate version 3"), not computed at decode (:func:`_skip_at_decode`)."""
    n = helper.make_node
    score = [
        *_pooled_feature_nodes(opset),
        # e_s: the max term of every position, normalised like version 2's term.
        n("MatMul", ["hidden_f32", "max_weight"], ["max_dots"]),
        n("Div", ["max_dots", "norm_floor"], ["max_dots_normalised"]),
        n("Where", ["do_normalise", "max_dots_normalised", "max_dots"], ["max_terms"]),
        # The max's positions: every valid position of this call, or last_b on a row with none (fallback is all
        # false on the other rows). The rest are -inf through Where, so no value of theirs (NaN included) enters.
        n("Or", ["valid", "fallback"], ["max_positions"]),
        _f32_scalar("minus_inf", -np.inf),
        n("Where", ["max_positions", "max_terms", "minus_inf"], ["max_candidates"]),
        *([n("ReduceMax", ["max_candidates", "axis1"], ["max_raw"], keepdims=0)] if opset >= 18 else
          [n("ReduceMax", ["max_candidates"], ["max_raw"], axes=[1], keepdims=0)]),
        # A NaN among the max's positions makes m NaN (ReduceMax's NaN handling is not specified): counted, then set.
        n("IsNaN", ["max_terms"], ["max_term_nan"]),
        n("And", ["max_term_nan", "max_positions"], ["max_nan_at"]),
        n("Cast", ["max_nan_at"], ["max_nan_i64"], to=TensorProto.INT64),
        n("ReduceSum", ["max_nan_i64", "axis1"], ["max_nan_count"], keepdims=0),
        n("Greater", ["max_nan_count", "zero"], ["max_is_nan"]),
        _f32_scalar("nan_f", np.nan),
        n("Where", ["max_is_nan", "nan_f", "max_raw"], ["max_feature"]),
        n("Add", ["score_in", "feature"], ["partial"]),
        n("Add", ["partial", "max_feature"], ["partial_max"]),
        n("Add", ["partial_max", "bias"], ["computed_score"]),
        *_decision_nodes(),
    ]
    return [
        _ref_constant("weight", "weight", "value"),
        _ref_constant("max_weight", "max_weight", "value"),
        _ref_constant("bias", "bias", "value_float"),
        _ref_constant("tokens", "tokens", "value_int"),
        _ref_constant("normalize", "normalize", "value_int"),
        *_call_shape_nodes(),
        *_skip_at_decode(score),
    ]


def _steer_shift_body() -> list[onnx.NodeProto]:
    """Nodes of SteerShift: (hidden, gate) -> out = hidden + gate[b] * vector, in float32, cast back."""
    n = helper.make_node
    return [
        _ref_constant("vector", "vector", "value"),
        _i64("axes", [1, 2]),
        n("Cast", ["hidden"], ["hidden_f32"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["gate", "axes"], ["gate_b11"]),
        n("Mul", ["gate_b11", "vector"], ["shift"]),
        n("Add", ["hidden_f32", "shift"], ["shifted"]),
        n("CastLike", ["shifted", "hidden"], ["out"]),
    ]


def _steer_shift_v2_body() -> list[onnx.NodeProto]:
    """SteerShift version 2 ("norm", issue 17): (hidden, gate) -> out; with ``y = h + gate[b]·vector`` in float32,
    ``out = y · (‖h‖ / max(‖y‖, 1e-6))`` cast back, and ``out = hidden`` itself on a row whose gate is 0
    (docs/contract.md "SteerShift version 2")."""
    n = helper.make_node
    return [
        _ref_constant("vector", "vector", "value"),
        _i64("axes", [1, 2]),
        _i64("axis_hidden", [-1]),
        n("Cast", ["hidden"], ["hidden_f32"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["gate", "axes"], ["gate_b11"]),
        n("Mul", ["gate_b11", "vector"], ["shift"]),
        n("Add", ["hidden_f32", "shift"], ["shifted"]),
        # The norm of each position before the shift and after it, [B, S, 1].
        n("Mul", ["hidden_f32", "hidden_f32"], ["squares_before"]),
        n("ReduceSum", ["squares_before", "axis_hidden"], ["norm_sq_before"], keepdims=1),
        n("Sqrt", ["norm_sq_before"], ["norm_before"]),
        n("Mul", ["shifted", "shifted"], ["squares_after"]),
        n("ReduceSum", ["squares_after", "axis_hidden"], ["norm_sq_after"], keepdims=1),
        n("Sqrt", ["norm_sq_after"], ["norm_after"]),
        _f32_scalar("norm_eps", NORM_EPS),
        n("Max", ["norm_after", "norm_eps"], ["norm_after_floor"]),
        n("Div", ["norm_before", "norm_after_floor"], ["scale"]),
        n("Mul", ["shifted", "scale"], ["rescaled"]),
        n("CastLike", ["rescaled", "hidden"], ["rescaled_cast"]),
        # A gate-0 row is the input itself, not the (inexact) rescaling of an unshifted state. The rows are picked
        # with Gather from [hidden; rescaled] (row b, or B + b where the gate is not 0), which moves bytes: ONNX
        # Runtime's Where on floats turns -0.0 into +0.0.
        _f32_scalar("zero_gate", 0.0),
        _i64("zero_row", 0),
        _i64("one_row", 1),
        n("Equal", ["gate", "zero_gate"], ["gate_off"]),
        n("Not", ["gate_off"], ["gate_on"]),
        n("Cast", ["gate_on"], ["gate_on_i64"], to=TensorProto.INT64),
        n("Shape", ["gate"], ["gate_shape"]),
        n("Gather", ["gate_shape", "zero_row"], ["rows"], axis=0),
        n("Range", ["zero_row", "rows", "one_row"], ["row_index"]),
        n("Mul", ["gate_on_i64", "rows"], ["row_offset"]),
        n("Add", ["row_index", "row_offset"], ["picked_rows"]),
        n("Concat", ["hidden", "rescaled_cast"], ["both"], axis=0),
        n("Gather", ["both", "picked_rows"], ["out"], axis=0),
    ]


# --- the registries: each gate kind and shift mode of the contract as ONNX -------------------------------------------
# A node builder: (gate, layer, hidden, attention_mask, gate_in, score_in or None, gate_out, score_out, name) -> node.
GateNodeBuilder = Callable[[GateConfig, int, str, str, str, "str | None", str, str, str], onnx.NodeProto]


@dataclass(frozen=True)
class GateOp:
    """How one registered gate kind (``contract.GATE_KINDS``) is written in ONNX: its SteerGate function body and
    the builder of one node of it. The function's formal inputs follow from the kind's ``chained`` (a chained kind
    takes ``score_in``) and its attributes are the kind's ``constants``, so neither is spelled twice."""

    body: Callable[[int], list[onnx.NodeProto]]
    node: GateNodeBuilder


@dataclass(frozen=True)
class ShiftOp:
    """How one registered shift mode (``contract.SHIFT_MODES``) is written in ONNX: its SteerShift function body and
    the function's doc string."""

    body: Callable[[], list[onnx.NodeProto]]
    doc: str


GATE_OPS: dict[str, GateOp] = {}  # by contract.GateKind.name
SHIFT_OPS: dict[str, ShiftOp] = {}  # by contract.ShiftMode.name


def register_gate_op(kind_name: str, op: GateOp) -> GateOp:
    """The ONNX form of the contract's gate kind ``kind_name`` (which must be registered there first)."""
    if kind_name not in {k.name for k in GATE_KINDS.values()}:
        raise ValueError(f"gate kind {kind_name!r} is not registered in aligner_runtime.contract.steering")
    if kind_name in GATE_OPS:
        raise ValueError(f"the ONNX form of gate kind {kind_name!r} is registered already")
    GATE_OPS[kind_name] = op
    return op


def register_shift_op(mode_name: str, op: ShiftOp) -> ShiftOp:
    """The ONNX form of the contract's shift mode ``mode_name`` (which must be registered there first)."""
    shift_mode_named(mode_name)
    if mode_name in SHIFT_OPS:
        raise ValueError(f"the ONNX form of shift mode {mode_name!r} is registered already")
    SHIFT_OPS[mode_name] = op
    return op


def gate_op(version: int) -> GateOp:
    """The ONNX form of SteerGate ``version``; ValueError naming the versions when there is none."""
    try:
        return GATE_OPS[gate_kind(version).name]
    except (KeyError, ValueError):
        raise ValueError(f"unknown SteerGate version {version!r} (registered: "
                         f"{', '.join(str(v) for v, k in GATE_KINDS.items() if k.name in GATE_OPS)})") from None


def gate_inputs(version: int) -> list[str]:
    """The formal inputs of SteerGate ``version``."""
    return ["hidden", ATTENTION_MASK, "gate_in", *(["score_in"] if gate_kind(version).chained else [])]


def shift_op(version: int) -> ShiftOp:
    """The ONNX form of SteerShift ``version``; ValueError naming the versions when there is none."""
    try:
        return SHIFT_OPS[shift_mode_of_version(version).name]
    except (KeyError, ValueError):
        raise ValueError(f"unknown SteerShift version {version!r} (registered: "
                         f"{', '.join(str(v) for v, m in SHIFT_MODES.items() if m.name in SHIFT_OPS)})") from None


def function_protos(opset: int, gate_version: int = 1, shift_version: int = 1) -> list[onnx.FunctionProto]:
    """The SteerGate (of ``gate_version``) and SteerShift (of ``shift_version``) functions for a model whose
    default-domain opset is ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"the steering functions need opset >= {MIN_OPSET}, the model has {opset}")
    op, shift = gate_op(gate_version), shift_op(shift_version)
    imports = [helper.make_opsetid("", opset)]
    gate = helper.make_function(DOMAIN, STEER_GATE, gate_inputs(gate_version), ["gate", "score"], op.body(opset),
                                imports, [*gate_kind(gate_version).constants, *PLUGIN_ATTRIBUTES],
                                doc_string=f"docs/contract.md SteerGate version {gate_version}")
    return [gate, helper.make_function(DOMAIN, STEER_SHIFT, ["hidden", "gate"], ["out"], shift.body(), imports,
                                       [SHIFT_CONSTANT, *PLUGIN_ATTRIBUTES], doc_string=shift.doc)]


def _vector_attr(values: np.ndarray, what: str) -> onnx.TensorProto:
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be a finite 1-D float32 vector, got shape {arr.shape}")
    return numpy_helper.from_array(arr, what)


def make_steer_gate_node(hidden: str, attention_mask: str, gate_in: str, gate_out: str, score_out: str,
                         direction: np.ndarray, bias: float, name: str) -> onnx.NodeProto:
    """A SteerGate version 1 node."""
    if not np.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    return helper.make_node(STEER_GATE, [hidden, attention_mask, gate_in], [gate_out, score_out], name=name,
                            domain=DOMAIN, direction=_vector_attr(direction, "direction"), bias=float(bias),
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=plugin_version(STEER_GATE, 1))


def make_steer_gate_v2_node(hidden: str, attention_mask: str, gate_in: str, score_in: str, gate_out: str,
                            score_out: str, weight: np.ndarray, bias: float, tokens: int, normalize: bool,
                            name: str) -> onnx.NodeProto:
    """A SteerGate version 2 node: one gate layer's term of the §5.1 score, added to ``score_in``."""
    if not np.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    if isinstance(tokens, bool) or int(tokens) != tokens or tokens < 1:
        raise ValueError(f"tokens must be an integer >= 1, got {tokens!r}")
    return helper.make_node(STEER_GATE, [hidden, attention_mask, gate_in, score_in], [gate_out, score_out],
                            name=name, domain=DOMAIN, weight=_vector_attr(weight, "weight"), bias=float(bias),
                            tokens=int(tokens), normalize=int(bool(normalize)), plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=plugin_version(STEER_GATE, 2))


def make_steer_gate_v3_node(hidden: str, attention_mask: str, gate_in: str, score_in: str, gate_out: str,
                            score_out: str, weight: np.ndarray, max_weight: np.ndarray, bias: float, tokens: int,
                            normalize: bool, name: str) -> onnx.NodeProto:
    """A SteerGate version 3 node (issue 18): one gate layer's pooled term and max term, added to ``score_in``."""
    if not np.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    if isinstance(tokens, bool) or int(tokens) != tokens or tokens < 1:
        raise ValueError(f"tokens must be an integer >= 1, got {tokens!r}")
    weight_attr, max_attr = _vector_attr(weight, "weight"), _vector_attr(max_weight, "max_weight")
    if max_attr.dims != weight_attr.dims:
        raise ValueError(f"max_weight has {list(max_attr.dims)} values, weight {list(weight_attr.dims)}")
    return helper.make_node(STEER_GATE, [hidden, attention_mask, gate_in, score_in], [gate_out, score_out],
                            name=name, domain=DOMAIN, weight=weight_attr, max_weight=max_attr, bias=float(bias),
                            tokens=int(tokens), normalize=int(bool(normalize)), plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=plugin_version(STEER_GATE, 3))


def make_steer_shift_node(hidden: str, gate: str, out: str, vector: np.ndarray, name: str,
                          version: int = 1) -> onnx.NodeProto:
    """A SteerShift node of ``version`` (1: "add", 2: "norm"; the same inputs, outputs and constant)."""
    shift_op(version)  # an unknown version is refused here
    return helper.make_node(STEER_SHIFT, [hidden, gate], [out], name=name, domain=DOMAIN,
                            **{SHIFT_CONSTANT: _vector_attr(vector, SHIFT_CONSTANT)}, plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=plugin_version(STEER_SHIFT, shift_version=version))


def _paper_node(gate: GateConfig, layer: int, hidden: str, mask: str, gate_in: str, score_in, gate_out: str,
                score_out: str, name: str) -> onnx.NodeProto:
    return make_steer_gate_node(hidden, mask, gate_in, gate_out, score_out, gate.weights[layer], gate.bias, name)


def _linear_node(gate: GateConfig, layer: int, hidden: str, mask: str, gate_in: str, score_in, gate_out: str,
                 score_out: str, name: str) -> onnx.NodeProto:
    """One layer's term of the §5.1 score; only the node at g* adds the bias."""
    bias = gate.bias if layer == gate.last_layer else 0.0
    return make_steer_gate_v2_node(hidden, mask, gate_in, score_in, gate_out, score_out, gate.weights[layer], bias,
                                   gate.tokens, gate.normalize, name)


def _pooled_node(gate: GateConfig, layer: int, hidden: str, mask: str, gate_in: str, score_in, gate_out: str,
                 score_out: str, name: str) -> onnx.NodeProto:
    """One layer's pooled and max terms of issue 18's score; only the node at g* adds the bias."""
    bias = gate.bias if layer == gate.last_layer else 0.0
    return make_steer_gate_v3_node(hidden, mask, gate_in, score_in, gate_out, score_out, gate.weights[layer],
                                   gate.max_weights[layer], bias, gate.tokens, gate.normalize, name)


register_gate_op("paper", GateOp(body=_steer_gate_v1_body, node=_paper_node))
register_gate_op("linear", GateOp(body=_steer_gate_v2_body, node=_linear_node))
register_gate_op("pooled", GateOp(body=_steer_gate_v3_body, node=_pooled_node))
register_shift_op("add", ShiftOp(body=_steer_shift_body, doc="docs/architecture.md §5 SteerShift"))
register_shift_op("norm", ShiftOp(body=_steer_shift_v2_body, doc="docs/contract.md SteerShift version 2"))


def node_attr(node: onnx.NodeProto, name: str):
    """The value of attribute ``name`` of ``node`` (numpy array for tensors), or None."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
            return value.decode() if isinstance(value, bytes) else value
    return None


def inline_nodes(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """The body of a SteerGate/SteerShift ``node`` as plain standard-domain nodes (``--steer-impl inline``).

    Formal inputs/outputs become the node's actual names, other values get the node name as prefix, and attribute
    references become the node's attribute values; node names are ``{node.name}/{op}_{i}`` so Netron groups them.
    The same holds inside the subgraphs of an ``If`` (SteerGate's score, issue 20): their own values and the values
    they read from the body get the prefix, their nodes are named ``{If's name}/{branch}/{op}_{j}``.
    """
    if node.domain != DOMAIN or node.op_type not in OP_TYPES:
        raise ValueError(f"not a steering node: {node.domain}:{node.op_type}")
    version = int(node_attr(node, "plugin_version") or 1)
    versions = {"gate_version": version} if node.op_type == STEER_GATE else {"shift_version": version}
    function = {f.name: f for f in function_protos(opset, **versions)}[node.op_type]
    rename = dict(zip(function.input, node.input))
    rename.update(zip(function.output, node.output))
    attrs = {a.name: a for a in node.attribute}

    def value(name: str) -> str:
        return (rename.get(name) or f"{node.name}/{name}") if name else name

    def inlined(inner: onnx.NodeProto, name: str) -> onnx.NodeProto:
        out = onnx.NodeProto()
        out.CopyFrom(inner)
        out.name = name
        out.input[:] = [value(x) for x in inner.input]
        out.output[:] = [value(x) for x in inner.output]
        for attr in out.attribute:
            if attr.ref_attr_name:
                actual = attrs[attr.ref_attr_name]
                ref_name = attr.name
                attr.CopyFrom(actual)
                attr.name = ref_name
            elif attr.type == onnx.AttributeProto.GRAPH:
                graph = attr.g
                renamed = [inlined(sub, f"{name}/{attr.name}/{sub.op_type}_{j}") for j, sub in enumerate(graph.node)]
                del graph.node[:]
                graph.node.extend(renamed)
                for info in (*graph.input, *graph.output, *graph.value_info):
                    info.name = value(info.name)
                for init in graph.initializer:
                    init.name = value(init.name)
        return out

    return [inlined(inner, f"{node.name}/{inner.op_type}_{i}") for i, inner in enumerate(function.node)]
