"""The two steering operators as ONNX model-local functions (ARCHITECTURE.md §5).

``SteerGate`` and ``SteerShift`` live in domain ``inferaligner``, version 1. Each node carries its constants as node
attributes (``direction`` and ``bias`` for SteerGate, ``vector`` for SteerShift) that the function body reads through
``Constant(ref_attr_name=...)``, plus ``plugin_namespace`` / ``plugin_version`` so that TensorRT can map the node to our
plugin of the same name. The bodies use only standard ONNX ops and do their math in float32 whatever the model's
dtype: the gathered row and the residual are cast to float32, and SteerShift casts its result back with ``CastLike``.

``inline_nodes`` expands a node into the same body as plain ops in the main graph (``--steer-impl inline``), so both
forms compute exactly the same thing.

This module imports only ``onnx`` and ``numpy``: the TensorRT helper and the tests import it without torch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner_runtime.contract import (DOMAIN, OP_TYPES, PLUGIN_ATTRIBUTES, PLUGIN_NAMESPACE, STEER_GATE,
                                      STEER_SHIFT, plugin_version)

# Lowest standard opset the bodies are written for (GatherND batch_dims, CastLike, Unsqueeze with axes input).
MIN_OPSET = 15



def _ref_constant(output: str, attr: str, kind: str) -> onnx.NodeProto:
    """A ``Constant`` whose value is the calling node's attribute ``attr`` (``kind`` is value / value_float)."""
    node = helper.make_node("Constant", [], [output])
    ref = onnx.AttributeProto()
    ref.name = kind
    ref.ref_attr_name = attr
    ref.type = onnx.AttributeProto.TENSOR if kind == "value" else onnx.AttributeProto.FLOAT
    node.attribute.append(ref)
    return node


def _i64(output: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output],
                            value=numpy_helper.from_array(np.asarray(values, dtype=np.int64), output))


def _f32_scalar(output: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output],
                            value=numpy_helper.from_array(np.asarray(value, dtype=np.float32), output))


def _steer_gate_body(opset: int) -> list[onnx.NodeProto]:
    """Nodes of SteerGate: (hidden, attention_mask, gate_in) -> (gate, score). See §5 for ``last_b``."""
    n = helper.make_node
    nodes = [
        _ref_constant("direction", "direction", "value"),
        _ref_constant("bias", "bias", "value_float"),
        _i64("zero", 0),
        _i64("one", 1),
        _i64("minus_one", -1),
        _i64("axis1", [1]),
        # T = past + S from the mask, S from hidden.
        n("Shape", ["attention_mask"], ["mask_shape"]),
        n("Gather", ["mask_shape", "one"], ["T"], axis=0),
        n("Shape", ["hidden"], ["hidden_shape"]),
        n("Gather", ["hidden_shape", "one"], ["S"], axis=0),
        # t*[b] = last t in [0, T) with mask 1, or -1 when the row has none.
        n("Range", ["zero", "T", "one"], ["positions"]),
        n("Equal", ["attention_mask", "one"], ["is_token"]),
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
        n("Unsqueeze", ["last_b", "axis1"], ["last_index"]),
        n("GatherND", ["hidden", "last_index"], ["last_hidden"], batch_dims=1),
        # float32 accumulation whatever the model's dtype.
        n("Cast", ["last_hidden"], ["last_hidden_f32"], to=TensorProto.FLOAT),
        n("MatMul", ["last_hidden_f32", "direction"], ["projection"]),
        n("Add", ["projection", "bias"], ["score"]),
        _f32_scalar("zero_f", 0.0),
        n("Greater", ["score", "zero_f"], ["fires"]),
        n("Cast", ["fires"], ["decided"], to=TensorProto.FLOAT),
        n("GreaterOrEqual", ["gate_in", "zero_f"], ["forced"]),
        n("Where", ["forced", "gate_in", "decided"], ["gate"]),
    ]
    return nodes


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


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    """The SteerGate and SteerShift functions for a model whose default-domain opset is ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"the steering functions need opset >= {MIN_OPSET}, the model has {opset}")
    imports = [helper.make_opsetid("", opset)]
    gate = helper.make_function(DOMAIN, STEER_GATE, ["hidden", "attention_mask", "gate_in"], ["gate", "score"],
                                _steer_gate_body(opset), imports, ["direction", "bias", *PLUGIN_ATTRIBUTES],
                                doc_string="ARCHITECTURE.md §5 SteerGate")
    shift = helper.make_function(DOMAIN, STEER_SHIFT, ["hidden", "gate"], ["out"], _steer_shift_body(), imports,
                                 ["vector", *PLUGIN_ATTRIBUTES], doc_string="ARCHITECTURE.md §5 SteerShift")
    return [gate, shift]


def _vector_attr(values: np.ndarray, what: str) -> onnx.TensorProto:
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be a finite 1-D float32 vector, got shape {arr.shape}")
    return numpy_helper.from_array(arr, what)


def make_steer_gate_node(hidden: str, attention_mask: str, gate_in: str, gate_out: str, score_out: str,
                         direction: np.ndarray, bias: float, name: str) -> onnx.NodeProto:
    if not np.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    return helper.make_node(STEER_GATE, [hidden, attention_mask, gate_in], [gate_out, score_out], name=name,
                            domain=DOMAIN, direction=_vector_attr(direction, "direction"), bias=float(bias),
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=plugin_version(STEER_GATE))


def make_steer_shift_node(hidden: str, gate: str, out: str, vector: np.ndarray, name: str) -> onnx.NodeProto:
    return helper.make_node(STEER_SHIFT, [hidden, gate], [out], name=name, domain=DOMAIN,
                            vector=_vector_attr(vector, "vector"), plugin_namespace=PLUGIN_NAMESPACE,
                            plugin_version=plugin_version(STEER_SHIFT))


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
    """
    if node.domain != DOMAIN or node.op_type not in OP_TYPES:
        raise ValueError(f"not a steering node: {node.domain}:{node.op_type}")
    function = {f.name: f for f in function_protos(opset)}[node.op_type]
    rename = dict(zip(function.input, node.input))
    rename.update(zip(function.output, node.output))
    attrs = {a.name: a for a in node.attribute}

    def value(name: str) -> str:
        return rename.get(name) or f"{node.name}/{name}"

    body = []
    for i, inner in enumerate(function.node):
        out = onnx.NodeProto()
        out.CopyFrom(inner)
        out.name = f"{node.name}/{inner.op_type}_{i}"
        out.input[:] = [value(x) for x in inner.input]
        out.output[:] = [value(x) for x in inner.output]
        for attr in out.attribute:
            if attr.ref_attr_name:
                actual = attrs[attr.ref_attr_name]
                ref_name = attr.name
                attr.CopyFrom(actual)
                attr.name = ref_name
        body.append(out)
    return body
