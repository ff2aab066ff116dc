"""SteerGate (versions 1, 2 and 3) and SteerShift as ONNX functions and inlined, run by ONNX Runtime, against the numpy
oracles of ``tests/op_oracles.py`` (docs/contract.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import op_oracles
from aligner_export.graph import onnx_ops

ort = pytest.importorskip("onnxruntime")

OPSETS = (17, 18)
GATE = "/model/layers.1/steer/SteerGate"
SHIFT = "/model/layers.1/steer/SteerShift"


def build_model(opset: int, H: int, gate_node, vector, dtype=TensorProto.FLOAT, impl="function", version=1):
    shift_node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, SHIFT)
    nodes = [gate_node, shift_node]
    functions = onnx_ops.function_protos(opset, version)
    if impl == "inline":
        nodes = [n for node in nodes for n in onnx_ops.inline_nodes(node, opset)]
        functions = []
    inputs = [helper.make_tensor_value_info("hidden", dtype, ["B", "S", H]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("gate_in", TensorProto.FLOAT, ["B"])]
    if version >= 2:
        inputs.append(helper.make_tensor_value_info("score_in", TensorProto.FLOAT, ["B"]))
    graph = helper.make_graph(
        nodes, "steer", inputs,
        [helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("out", dtype, ["B", "S", H])])
    imports = [helper.make_opsetid("", opset)]
    if impl == "function":
        imports.append(helper.make_opsetid(onnx_ops.DOMAIN, version))
    model = helper.make_model(graph, opset_imports=imports, functions=functions, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def v1_model(opset, H, direction, bias, vector, dtype=TensorProto.FLOAT, impl="function"):
    node = onnx_ops.make_steer_gate_node("hidden", "attention_mask", "gate_in", "gate", "score", direction, bias, GATE)
    return build_model(opset, H, node, vector, dtype, impl, version=1)


def v2_model(opset, H, weight, bias, tokens, normalize, vector, dtype=TensorProto.FLOAT, impl="function"):
    node = onnx_ops.make_steer_gate_v2_node("hidden", "attention_mask", "gate_in", "score_in", "gate", "score",
                                            weight, bias, tokens, normalize, GATE)
    return build_model(opset, H, node, vector, dtype, impl, version=2)


def v3_model(opset, H, weight, max_weight, bias, tokens, normalize, vector, dtype=TensorProto.FLOAT, impl="function"):
    node = onnx_ops.make_steer_gate_v3_node("hidden", "attention_mask", "gate_in", "score_in", "gate", "score",
                                            weight, max_weight, bias, tokens, normalize, GATE)
    return build_model(opset, H, node, vector, dtype, impl, version=3)


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


def _case(case: str, H: int = 16):
    rows, S = CASES[case]
    mask = np.array(rows, np.int64)
    rng = np.random.default_rng(len(case))
    hidden = rng.normal(size=(2, S, H)).astype(np.float32)
    return mask, hidden, rng


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_v1_matches_oracle(opset, impl, case):
    mask, hidden, rng = _case(case)
    H = hidden.shape[2]
    direction = rng.normal(size=H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vector = (4.0 * rng.normal(size=H)).astype(np.float32)
    _, score0 = op_oracles.steer_gate_v1(hidden, mask, np.array([-1, -1], np.float32), direction, 0.0)
    bias = float(-score0.mean())  # splits the two rows: one fires, one does not
    model = v1_model(opset, H, direction, bias, vector, impl=impl)
    for gate_in in ([-1, -1], [1, -1], [0, 0], [-1, 1]):
        gate_in = np.array(gate_in, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=gate_in)
        ref_gate, ref_score = op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, bias)
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(gate, ref_gate)
        np.testing.assert_allclose(out, op_oracles.steer_shift(hidden, ref_gate, vector), rtol=0, atol=1e-6)
    gate, _, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=np.array([-1, -1], np.float32))
    assert sorted(gate.tolist()) == [0.0, 1.0], "the chosen bias must split the rows"


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("normalize", [False, True])
def test_v2_matches_oracle(opset, impl, case, tokens, normalize):
    mask, hidden, rng = _case(case)
    H = hidden.shape[2]
    hidden *= 3.0
    weight = rng.normal(size=H).astype(np.float32)  # not unit: v2 weights carry the scale
    vector = (4.0 * rng.normal(size=H)).astype(np.float32)
    score_in = rng.normal(size=2).astype(np.float32)
    minus = np.array([-1, -1], np.float32)
    _, score0 = op_oracles.steer_gate_v2(hidden, mask, minus, score_in, weight, 0.0, tokens, normalize)
    bias = float(-score0.mean())
    model = v2_model(opset, H, weight, bias, tokens, normalize, vector, impl=impl)
    for gate_in in ([-1, -1], [1, -1], [0, 0]):
        gate_in = np.array(gate_in, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=gate_in, score_in=score_in)
        ref_gate, ref_score = op_oracles.steer_gate_v2(hidden, mask, gate_in, score_in, weight, bias, tokens,
                                                       normalize)
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(gate, ref_gate)
        np.testing.assert_allclose(out, op_oracles.steer_shift(hidden, ref_gate, vector), rtol=0, atol=1e-5)
    gate, _, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=minus, score_in=score_in)
    assert sorted(gate.tolist()) == [0.0, 1.0], "the chosen bias must split the rows"


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_v3_matches_oracle(opset, impl, case, tokens, normalize):
    """Issue 18: the pooled term plus the max over every valid position of this call (left and right padding,
    decode calls, a row without tokens), against the oracle; the max term changes the score of every row."""
    mask, hidden, rng = _case(case)
    H = hidden.shape[2]
    hidden *= 3.0
    weight = rng.normal(size=H).astype(np.float32)
    max_weight = (2.0 * rng.normal(size=H)).astype(np.float32)
    vector = (4.0 * rng.normal(size=H)).astype(np.float32)
    score_in = rng.normal(size=2).astype(np.float32)
    minus = np.array([-1, -1], np.float32)
    _, score0 = op_oracles.steer_gate_v3(hidden, mask, minus, score_in, weight, max_weight, 0.0, tokens, normalize)
    _, without_max = op_oracles.steer_gate_v2(hidden, mask, minus, score_in, weight, 0.0, tokens, normalize)
    assert np.all(np.abs(score0 - without_max) > 1e-3), "the max term must matter on every row"
    bias = float(-score0.mean())
    model = v3_model(opset, H, weight, max_weight, bias, tokens, normalize, vector, impl=impl)
    for gate_in in ([-1, -1], [1, -1], [0, 0]):
        gate_in = np.array(gate_in, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=gate_in, score_in=score_in)
        ref_gate, ref_score = op_oracles.steer_gate_v3(hidden, mask, gate_in, score_in, weight, max_weight, bias,
                                                       tokens, normalize)
        np.testing.assert_allclose(score, ref_score, rtol=0, atol=3e-5)
        np.testing.assert_array_equal(gate, ref_gate)
        np.testing.assert_allclose(out, op_oracles.steer_shift(hidden, ref_gate, vector), rtol=0, atol=1e-5)
    gate, _, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=minus, score_in=score_in)
    assert sorted(gate.tolist()) == [0.0, 1.0], "the chosen bias must split the rows"


@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_v3_with_zero_max_weight_is_v2(impl, case):
    """docs/contract.md: with max_weight = 0 version 3's score is version 2's (adding the max term's 0)."""
    mask, hidden, rng = _case(case)
    H = hidden.shape[2]
    weight = rng.normal(size=H).astype(np.float32)
    vector = rng.normal(size=H).astype(np.float32)
    feeds = dict(hidden=hidden, attention_mask=mask, gate_in=np.array([-1, -1], np.float32),
                 score_in=rng.normal(size=2).astype(np.float32))
    v2 = run(v2_model(18, H, weight, 0.25, 3, True, vector, impl=impl), **feeds)
    v3 = run(v3_model(18, H, weight, np.zeros(H, np.float32), 0.25, 3, True, vector, impl=impl), **feeds)
    np.testing.assert_array_equal(v2[0], v3[0])
    np.testing.assert_array_equal(v2[1], v3[1])
    np.testing.assert_array_equal(v2[2], v3[2])


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_v3_max_nan_and_masked_positions(impl):
    """A NaN at a position of the max makes the score NaN (and steers); a NaN or a huge value at a padded position
    never enters; a row with no valid position reads last_b alone."""
    H, S = 4, 3
    hidden = np.zeros((4, S, H), np.float32)
    hidden[:, :, 0] = 1.0
    hidden[0, 0, 1] = np.nan  # row 0: NaN at a valid position (not among the last K = 1)
    hidden[1, 0, 1] = np.nan  # row 1: NaN at a padded position
    hidden[2, 0, 1] = 1e6  # row 2: a huge term at a padded position
    hidden[3, 1, 1] = 5.0  # row 3: no valid position; last_b = S-1 reads 0, not position 1's 5
    mask = np.array([[1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 0]], np.int64)
    weight = np.zeros(H, np.float32)
    max_weight = np.zeros(H, np.float32)
    max_weight[1] = 1.0
    model = v3_model(18, H, weight, max_weight, -0.5, 1, False, np.ones(H, np.float32), impl=impl)
    minus = np.full(4, -1, np.float32)
    gate, score, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=minus, score_in=np.zeros(4, np.float32))
    want_gate, want_score = op_oracles.steer_gate_v3(hidden, mask, minus, np.zeros(4, np.float32), weight,
                                                     max_weight, -0.5, 1, False)
    assert np.isnan(score[0]) and np.isnan(want_score[0])
    np.testing.assert_array_equal(score[1:], [-0.5, -0.5, -0.5])
    np.testing.assert_array_equal(score[1:], want_score[1:])
    np.testing.assert_array_equal(gate, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(gate, want_gate)


@pytest.mark.parametrize("case", sorted(CASES))
def test_v2_with_one_token_unit_weight_is_v1(case):
    """§5.1: K = 1, one layer, identity n, unit w and score_in = 0 is exactly SteerGate version 1."""
    mask, hidden, rng = _case(case)
    H = hidden.shape[2]
    direction = rng.normal(size=H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vector = rng.normal(size=H).astype(np.float32)
    feeds = dict(hidden=hidden, attention_mask=mask, gate_in=np.array([-1, -1], np.float32))
    v1 = run(v1_model(18, H, direction, 0.25, vector), **feeds)
    v2 = run(v2_model(18, H, direction, 0.25, 1, False, vector), **feeds, score_in=np.zeros(2, np.float32))
    np.testing.assert_array_equal(v1[0], v2[0])
    np.testing.assert_allclose(v1[1], v2[1], rtol=0, atol=1e-6)  # the dot product's addition order may differ
    np.testing.assert_array_equal(v1[2], v2[2])


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("impl", ["function", "inline"])
def test_non_finite_score_steers(version, impl):
    """Issue 14: NaN, +inf and -inf scores steer; an imposed gate_in still wins."""
    H = 8
    hidden = np.ones((4, 2, H), np.float32)
    hidden[0, -1, 0] = np.nan
    hidden[1, -1, 0] = np.inf
    hidden[2, -1, 0] = -np.inf
    weight = np.zeros(H, np.float32)
    weight[0] = 1.0
    vector = np.ones(H, np.float32)
    mask = np.ones((4, 2), np.int64)
    if version == 1:
        model = v1_model(18, H, weight, -100.0, vector, impl=impl)
    elif version == 2:
        model = v2_model(18, H, weight, -100.0, 1, False, vector, impl=impl)
    else:  # the max term reads the same entry at every position: the score is the last position's plus 1
        model = v3_model(18, H, weight, weight, -101.0, 1, False, vector, impl=impl)
    extra = {} if version == 1 else {"score_in": np.zeros(4, np.float32)}
    gate, score, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=np.full(4, -1, np.float32), **extra)
    assert np.isnan(score[0]) and score[1] == np.inf and score[2] == -np.inf and score[3] == -99.0
    np.testing.assert_array_equal(gate, [1.0, 1.0, 1.0, 0.0])
    gate, _, _ = run(model, hidden=hidden, attention_mask=mask, gate_in=np.array([0, 0, 1, np.nan], np.float32),
                     **extra)
    np.testing.assert_array_equal(gate, [0.0, 0.0, 1.0, 0.0])  # NaN gate_in is not >= 0: decided, -99 -> 0


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_gate_zero_is_bit_identical(impl):
    rng = np.random.default_rng(1)
    hidden = (rng.normal(size=(2, 3, 8)) * 100).astype(np.float32)
    model = v1_model(17, 8, np.ones(8, np.float32) / np.sqrt(8), 0.0, rng.normal(size=8).astype(np.float32),
                     impl=impl)
    _, _, out = run(model, hidden=hidden, attention_mask=np.ones((2, 3), np.int64),
                    gate_in=np.zeros(2, np.float32))
    assert out.tobytes() == hidden.tobytes()


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("impl", ["function", "inline"])
def test_fp16_math_stays_float32(version, impl):
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
    mask, minus = np.ones((2, 2), np.int64), np.full(2, -1, np.float32)
    if version == 1:
        model = v1_model(17, H, direction, 0.5, vector, dtype=TensorProto.FLOAT16, impl=impl)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=minus)
        ref_gate, ref_score = op_oracles.steer_gate_v1(hidden, mask, minus, direction, 0.5)
    elif version == 2:
        model = v2_model(17, H, direction, 0.5, 2, False, vector, dtype=TensorProto.FLOAT16, impl=impl)
        zeros = np.zeros(2, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=minus, score_in=zeros)
        ref_gate, ref_score = op_oracles.steer_gate_v2(hidden, mask, minus, zeros, direction, 0.5, 2, False)
    else:
        max_weight = 0.5 * direction
        model = v3_model(17, H, direction, max_weight, 0.5, 2, False, vector, dtype=TensorProto.FLOAT16, impl=impl)
        zeros = np.zeros(2, np.float32)
        gate, score, out = run(model, hidden=hidden, attention_mask=mask, gate_in=minus, score_in=zeros)
        ref_gate, ref_score = op_oracles.steer_gate_v3(hidden, mask, minus, zeros, direction, max_weight, 0.5, 2,
                                                       False)
    assert np.all(np.isfinite(score))
    np.testing.assert_allclose(score, ref_score, rtol=1e-6)
    np.testing.assert_array_equal(gate, [1.0, 0.0])
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, op_oracles.steer_shift(hidden, ref_gate, vector))


def test_nodes_carry_plugin_attributes_and_constants():
    direction = np.arange(4, dtype=np.float32)
    node = onnx_ops.make_steer_gate_node("h", "m", "g", "go", "so", direction, -0.5, "/model/layers.2/steer/SteerGate")
    assert (node.domain, node.op_type) == ("inferaligner", "SteerGate")
    assert onnx_ops.node_attr(node, "plugin_namespace") == "inferaligner"
    assert onnx_ops.node_attr(node, "plugin_version") == "1"
    np.testing.assert_array_equal(onnx_ops.node_attr(node, "direction"), direction)
    assert onnx_ops.node_attr(node, "bias") == -0.5
    v2 = onnx_ops.make_steer_gate_v2_node("h", "m", "g", "si", "go", "so", direction, 0.5, 4, True,
                                          "/model/layers.2/steer/SteerGate")
    assert list(v2.input) == ["h", "m", "g", "si"]
    assert onnx_ops.node_attr(v2, "plugin_version") == "2"
    assert (onnx_ops.node_attr(v2, "tokens"), onnx_ops.node_attr(v2, "normalize")) == (4, 1)
    np.testing.assert_array_equal(onnx_ops.node_attr(v2, "weight"), direction)
    v3 = onnx_ops.make_steer_gate_v3_node("h", "m", "g", "si", "go", "so", direction, -direction, 0.5, 4, True,
                                          "/model/layers.2/steer/SteerGate")
    assert list(v3.input) == ["h", "m", "g", "si"]
    assert onnx_ops.node_attr(v3, "plugin_version") == "3"
    np.testing.assert_array_equal(onnx_ops.node_attr(v3, "max_weight"), -direction)
    with pytest.raises(ValueError):
        onnx_ops.make_steer_gate_v3_node("h", "m", "g", "si", "go", "so", direction, direction[:2], 0.5, 1, True, "x")
    shift = onnx_ops.make_steer_shift_node("h", "g", "o", direction, "/model/layers.2/steer/SteerShift")
    assert onnx_ops.node_attr(shift, "plugin_version") == "1"
    with pytest.raises(ValueError):
        onnx_ops.make_steer_shift_node("h", "g", "o", np.array([np.nan], np.float32), "x")
    with pytest.raises(ValueError):
        onnx_ops.make_steer_gate_v2_node("h", "m", "g", "si", "go", "so", direction, 0.5, 0, False, "x")
    with pytest.raises(ValueError):
        onnx_ops.function_protos(13)


# --- the score at decode (docs/contract.md "The score at decode", issue 20) ------------------------------------------
def _gate_model(version: int, impl: str, H: int, rng, opset: int = 18):
    weight = rng.normal(size=H).astype(np.float32)
    vector = rng.normal(size=H).astype(np.float32)
    if version == 1:
        return v1_model(opset, H, weight, 0.5, vector, impl=impl), weight
    if version == 2:
        return v2_model(opset, H, weight, 0.5, 2, True, vector, impl=impl), weight
    return v3_model(opset, H, weight, _max_weight(weight), 0.5, 2, True, vector, impl=impl), weight


def _max_weight(weight):
    """The max weight the version-3 cases pair with ``weight``: another direction, of its own scale."""
    return np.roll(weight, 1) * np.float32(1.5)


def _gate_feeds(version, hidden, mask, gate_in, score_in):
    feeds = dict(hidden=hidden, attention_mask=mask, gate_in=np.asarray(gate_in, np.float32))
    if version >= 2:
        feeds["score_in"] = score_in
    return feeds


def _oracle(version, hidden, mask, gate_in, score_in, weight):
    gate_in = np.asarray(gate_in, np.float32)
    if version == 1:
        return op_oracles.steer_gate_v1(hidden, mask, gate_in, weight, 0.5)
    if version == 2:
        return op_oracles.steer_gate_v2(hidden, mask, gate_in, score_in, weight, 0.5, 2, True)
    return op_oracles.steer_gate_v3(hidden, mask, gate_in, score_in, weight, _max_weight(weight), 0.5, 2, True)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("impl", ["function", "inline"])
def test_score_at_decode(version, impl):
    """A decode call (past > 0) whose rows are all forced: score 0, gate = gate_in bit for bit (an infinite or large
    gate_in included); mixed rows: the deciding ones scored, the forced ones 0; a forced prefill: the real score."""
    rng = np.random.default_rng(20 + version)
    H, B = 16, 3
    model, weight = _gate_model(version, impl, H, rng)
    score_in = rng.normal(size=B).astype(np.float32)
    decode_mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 1]], np.int64)
    step = (rng.normal(size=(B, 1, H)) * 3).astype(np.float32)
    for gate_in in ([1.0, 0.0, 0.25], [np.inf, 1e30, 0.0]):
        gate, score, _ = run(model, **_gate_feeds(version, step, decode_mask, gate_in, score_in))
        assert score.tobytes() == np.zeros(B, np.float32).tobytes()
        assert gate.tobytes() == np.asarray(gate_in, np.float32).tobytes()
    for gate_in in ([1.0, -1.0, 0.0], [-1.0, np.nan, 1.0], [-1.0, -1.0, -1.0]):
        gate, score, _ = run(model, **_gate_feeds(version, step, decode_mask, gate_in, score_in))
        want_gate, want_score = _oracle(version, step, decode_mask, gate_in, score_in, weight)
        deciding = ~(np.asarray(gate_in) >= 0)
        assert np.all(want_score[deciding] != 0) and np.all(want_score[~deciding] == 0)
        np.testing.assert_allclose(score, want_score, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(gate, want_gate)
    prompt = (rng.normal(size=(B, 4, H)) * 3).astype(np.float32)
    prompt_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], np.int64)
    for gate_in in ([1.0, 0.0, 1.0], [0.0, 0.0, 0.0]):  # the evaluation reads the score of forced prefills
        gate, score, _ = run(model, **_gate_feeds(version, prompt, prompt_mask, gate_in, score_in))
        want_gate, want_score = _oracle(version, prompt, prompt_mask, gate_in, score_in, weight)
        assert np.all(want_score != 0)
        np.testing.assert_allclose(score, want_score, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(gate, want_gate)


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("past", [0, 3])
def test_empty_batch(version, impl, past):
    rng = np.random.default_rng(7)
    model, _ = _gate_model(version, impl, 8, rng)
    feeds = _gate_feeds(version, np.zeros((0, 2, 8), np.float32), np.zeros((0, 2 + past), np.int64),
                        np.zeros(0, np.float32), np.zeros(0, np.float32))
    gate, score, out = run(model, **feeds)
    assert gate.shape == score.shape == (0,) and out.shape == (0, 2, 8)


def _score_if(nodes) -> list[onnx.NodeProto]:
    return [n for n in nodes if n.op_type == "If"]


# The score's work, by version, and what any of it is.
SCORE_OPS = {1: {"MatMul", "GatherND", "ReduceMax", "Range"}, 2: {"MatMul", "ReduceMax", "CumSum", "Range", "Sqrt"},
             3: {"MatMul", "ReduceMax", "CumSum", "Range", "Sqrt", "IsNaN"}}
ANY_SCORE_OP = set.union(*SCORE_OPS.values())


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("impl", ["function", "inline"])
def test_score_work_sits_in_an_if(version, impl):
    """Structurally: each SteerGate's score computation is the then-branch of one If; its else-branch (every row
    forced at decode) is three nodes and does no score work; outside the If only the condition is computed."""
    rng = np.random.default_rng(1)
    model, _ = _gate_model(version, impl, 8, rng)
    if impl == "function":
        body = next(f for f in model.functions if f.name == "SteerGate").node
    else:
        body = [n for n in model.graph.node if n.name.startswith(GATE + "/")]
    ifs = _score_if(body)
    assert len(ifs) == 1
    branches = {a.name: a.g for a in ifs[0].attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity", "Shape", "ConstantOfShape"]
    assert SCORE_OPS[version] <= {n.op_type for n in branches["then_branch"].node}
    outside = [n for n in body if n.op_type != "If"]
    assert not ANY_SCORE_OP & {n.op_type for n in outside}
    assert sum(n.op_type != "Constant" for n in outside) <= 12
    if impl == "inline":  # every value inside the branches carries the node's prefix, or is a graph input
        inputs = {i.name for i in model.graph.input}
        for branch in branches.values():
            for n in branch.node:
                assert n.name.startswith(GATE + "/If_")
                assert all(v.startswith(GATE + "/") or v in inputs for v in [*n.input, *n.output] if v)


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_ort_optimisations_keep_the_if(impl, tmp_path):
    """ONNX Runtime's graph optimisations (constant folding included) inline the function and keep the If: the
    optimised graph still skips the score at decode."""
    rng = np.random.default_rng(2)
    model, _ = _gate_model(2, impl, 8, rng)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx"))
    assert not optimised.functions or all(n.domain != onnx_ops.DOMAIN for n in optimised.graph.node)
    ifs = _score_if(optimised.graph.node)
    assert len(ifs) == 1
    then_ops = {n.op_type for a in ifs[0].attribute if a.name == "then_branch" for n in a.g.node}
    assert {"MatMul", "CumSum"} <= then_ops
