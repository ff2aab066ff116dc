"""SteerGate / SteerShift ONNX functions against a numpy loop written from ARCHITECTURE.md §5."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aligner_export.graph import onnx_ops

ort = pytest.importorskip("onnxruntime")

OPSETS = (17, 18)


def reference_gate(hidden, mask, gate_in, direction, bias):
    """Numpy loop: §5 SteerGate."""
    B, S, _ = hidden.shape
    T = mask.shape[1]
    gate = np.zeros(B, np.float32)
    score = np.zeros(B, np.float32)
    for b in range(B):
        ones = [t for t in range(T) if mask[b, t] == 1]
        t_star = ones[-1] if ones else T - 1
        last = min(max(t_star - (T - S), 0), S - 1)
        acc = np.float32(0.0)
        for h in range(hidden.shape[2]):
            acc += np.float32(hidden[b, last, h]) * np.float32(direction[h])
        score[b] = acc + np.float32(bias)
        gate[b] = gate_in[b] if gate_in[b] >= 0 else (1.0 if score[b] > 0 else 0.0)
    return gate, score


def reference_shift(hidden, gate, vector):
    out = hidden.astype(np.float32) + gate[:, None, None] * vector[None, None, :].astype(np.float32)
    return out.astype(hidden.dtype)


def build_model(opset: int, H: int, direction, bias, vector, dtype=TensorProto.FLOAT, impl="function"):
    gate_node = onnx_ops.make_steer_gate_node("hidden", "attention_mask", "gate_in", "gate", "score", direction,
                                             bias, "/model/layers.1/steer/SteerGate")
    shift_node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, "/model/layers.1/steer/SteerShift")
    nodes = [gate_node, shift_node]
    functions = onnx_ops.function_protos(opset)
    if impl == "inline":
        nodes = [n for node in nodes for n in onnx_ops.inline_nodes(node, opset)]
        functions = []
    graph = helper.make_graph(
        nodes, "steer",
        [helper.make_tensor_value_info("hidden", dtype, ["B", "S", H]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("gate_in", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("out", dtype, ["B", "S", H])])
    imports = [helper.make_opsetid("", opset)]
    if impl == "function":
        imports.append(helper.make_opsetid(onnx_ops.DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=imports, functions=functions, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, **feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["gate", "score", "out"], feeds)


CASES = {
    # name: (mask rows, S) -- T = mask width, past = T - S
    "right_padding_prefill": ([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], 5),
    "left_padding_prefill": ([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], 5),
    "left_padding_decode": ([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], 1),
    "right_padding_decode_clamps": ([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]], 2),
    "row_without_tokens": ([[0, 0, 0, 0], [1, 1, 0, 0]], 4),
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ops_match_numpy_loop(opset, impl, case):
    rows, S = CASES[case]
    mask = np.array(rows, np.int64)
    rng = np.random.default_rng(len(case))
    H = 16
    hidden = rng.normal(size=(2, S, H)).astype(np.float32)
    direction = rng.normal(size=H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vector = (4.0 * rng.normal(size=H)).astype(np.float32)
    _, score0 = reference_gate(hidden, mask, np.array([-1, -1], np.float32), direction, 0.0)
    bias = float(-score0.mean())  # splits the two rows: one fires, one does not
    model = build_model(opset, H, direction, bias, vector, impl=impl)
    for gate_in in ([-1, -1], [1, -1], [0, 0], [-1, 1]):
        gate_in = np.array(gate_in, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=gate_in)
        ref_gate, ref_score = reference_gate(hidden, mask, gate_in, direction, bias)
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(gate, ref_gate)
        np.testing.assert_allclose(out, reference_shift(hidden, ref_gate, vector), rtol=0, atol=1e-6)
    gate, _, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=np.array([-1, -1], np.float32))
    assert sorted(gate.tolist()) == [0.0, 1.0], "the chosen bias must split the rows"


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_gate_zero_is_bit_identical(impl):
    rng = np.random.default_rng(1)
    hidden = (rng.normal(size=(2, 3, 8)) * 100).astype(np.float32)
    model = build_model(17, 8, np.ones(8, np.float32) / np.sqrt(8), 0.0, rng.normal(size=8).astype(np.float32),
                        impl=impl)
    _, _, out = run(model, hidden=hidden, attention_mask=np.ones((2, 3), np.int64),
                    gate_in=np.zeros(2, np.float32))
    assert out.tobytes() == hidden.tobytes()


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_fp16_math_stays_float32(impl):
    """Entries > 1e3: the float16 dot product overflows (> 65504); the float32 one does not."""
    H = 256
    hidden = np.full((2, 2, H), 5000.0, np.float16)
    hidden[1] *= -1
    direction = np.full(H, 1.0 / np.sqrt(H), np.float32)
    fp16_dot = np.float16(0)
    with np.errstate(over="ignore"):
        for h in range(H):
            fp16_dot = np.float16(fp16_dot + hidden[0, -1, h] * np.float16(direction[h]))
    assert not np.isfinite(fp16_dot), "the test needs a case where float16 accumulation overflows"
    vector = np.full(H, 0.25, np.float32)
    model = build_model(17, H, direction, 0.5, vector, dtype=TensorProto.FLOAT16, impl=impl)
    gate, score, out = run(model, hidden=hidden, attention_mask=np.ones((2, 2), np.int64),
                           gate_in=np.full(2, -1, np.float32))
    ref_gate, ref_score = reference_gate(hidden, np.ones((2, 2), np.int64), np.full(2, -1, np.float32),
                                         direction, 0.5)
    assert np.all(np.isfinite(score))
    np.testing.assert_allclose(score, ref_score, rtol=1e-6)
    np.testing.assert_array_equal(gate, [1.0, 0.0])
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, reference_shift(hidden, ref_gate, vector))


def test_nodes_carry_plugin_attributes_and_constants():
    direction = np.arange(4, dtype=np.float32)
    node = onnx_ops.make_steer_gate_node("h", "m", "g", "go", "so", direction, -0.5, "/model/layers.2/steer/SteerGate")
    assert (node.domain, node.op_type) == ("inferaligner", "SteerGate")
    assert onnx_ops.node_attr(node, "plugin_namespace") == "inferaligner"
    assert onnx_ops.node_attr(node, "plugin_version") == "1"
    np.testing.assert_array_equal(onnx_ops.node_attr(node, "direction"), direction)
    assert onnx_ops.node_attr(node, "bias") == -0.5
    shift = onnx_ops.make_steer_shift_node("h", "g", "o", direction, "/model/layers.2/steer/SteerShift")
    assert onnx_ops.node_attr(shift, "plugin_version") == "1"
    with pytest.raises(ValueError):
        onnx_ops.make_steer_shift_node("h", "g", "o", np.array([np.nan], np.float32), "x")
    with pytest.raises(ValueError):
        onnx_ops.function_protos(13)
