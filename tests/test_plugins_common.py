"""plugins/common CPU reference (libaligner_ops_ref, via ctypes) against the numpy oracles of ``tests/op_oracles.py``
and against the ONNX functions of ``aligner_export.graph.onnx_ops`` run by ONNX Runtime (docs/contract.md;
docs/architecture.md §5, §5.1, §8).

SteerGate versions 1 and 2 and SteerShift, in float32, float16 and bfloat16, with left and right padding, in prefill
(past 0), in a decode step (S = 1) and in a chunk after a past (S = 4, past 3), with rows that have no valid token;
version 2 with K in {1, 3, 8} (8 > S) and normalize 0/1; NaN and infinite scores (a non-finite score steers).

Scores are compared within a bound on float32 rounding computed per row from the same oracle run on absolute values
(|hidden|, |weight|, |score_in|, |bias|): the C++ reference sums in float32, the oracles in float64. The library comes
from the CMake build (``ALIGNER_NATIVE_BUILD``, default ``build/``); without it the tests skip and say so.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
from pathlib import Path

import numpy as np
import pytest

import op_oracles

ROOT = Path(__file__).resolve().parents[1]
STORAGE = {"fp32": 0, "fp16": 1, "bf16": 2}
DTYPES = ("fp32", "fp16", "bf16")
EPS32 = 2.0 ** -24


def _native_build() -> Path:
    return Path(os.environ.get("ALIGNER_NATIVE_BUILD", ROOT / "build"))


@pytest.fixture(scope="module")
def ref():
    path = _native_build() / "libaligner_ops_ref.so"
    if not path.is_file():
        pytest.skip(f"{path} not built (run `make native` or set ALIGNER_NATIVE_BUILD)")
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.aligner_ref_steer_gate.argtypes = [i32, p, i64, i64, i64, p, i64, p, p, f32, p, p]
    lib.aligner_ref_steer_gate.restype = i32
    if not hasattr(lib, "aligner_ref_steer_gate_v2"):
        pytest.fail(f"{path} has no aligner_ref_steer_gate_v2: rebuild it")
    lib.aligner_ref_steer_gate_v2.argtypes = [i32, p, i64, i64, i64, p, i64, p, p, p, f32, i64, i32, p, p]
    lib.aligner_ref_steer_gate_v2.restype = i32
    if hasattr(lib, "aligner_ref_steer_gate_v3"):  # a build from before issue 18 has none: its tests skip
        lib.aligner_ref_steer_gate_v3.argtypes = [i32, p, i64, i64, i64, p, i64, p, p, p, p, f32, i64, i32, p, p]
        lib.aligner_ref_steer_gate_v3.restype = i32
    lib.aligner_ref_steer_shift.argtypes = [i32, p, i64, i64, i64, p, p, p]
    lib.aligner_ref_steer_shift.restype = i32
    lib.aligner_ref_last_valid_position.argtypes = [p, i64, i64]
    lib.aligner_ref_last_valid_position.restype = i64
    return lib


def _np_dtype(name: str):
    if name == "bf16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (bfloat16 for numpy) is not installed")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[name])


def _ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


# --- cases ----------------------------------------------------------------------------------------------------------

# (S, past): prefill, a decode step, a chunk after a past.
CALLS = ((6, 0), (1, 3), (4, 3))


def _case(dtype: str, padding: str, H: int, S: int, past: int, seed: int = 0):
    """B = 6 rows of varied lengths; row 4 has no valid token at all; row 5's tokens all lie in the past when there
    is one (so the call has no valid position and version 2 falls back to last_b)."""
    rng = np.random.default_rng(seed * 1000 + 10 * H + S + 7 * past + (padding == "left"))
    B, T = 6, past + S
    hidden = (2.0 * rng.standard_normal((B, S, H))).astype(np.float32).astype(_np_dtype(dtype))
    mask = np.zeros((B, T), dtype=np.int64)
    lengths = [T, 1, 2 + T // 2, max(1, T - 1), 0, past if past else 3]
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, T - n:] = 1 if n else 0
        else:
            mask[b, :n] = 1
    if past and padding == "left":
        mask[5] = 0
        mask[5, :past] = 1  # tokens only in the past, whatever the padding
    gate_in = np.array([-1, -1, 0, 1, -1, -1], dtype=np.float32)
    return hidden, mask, gate_in


def _unit(rng, H):
    v = rng.standard_normal(H).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _abs(a):
    return np.abs(np.asarray(a))


# --- the C++ reference through ctypes ---------------------------------------------------------------------------------

def _ref_gate_v1(ref, dtype, hidden, mask, gate_in, direction, bias):
    B, S, H = hidden.shape
    gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
    status = ref.aligner_ref_steer_gate(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(mask), mask.shape[1],
                                        _ptr(gate_in), _ptr(direction), float(bias), _ptr(gate), _ptr(score))
    assert status == 0
    return gate, score


def _ref_gate_v2(ref, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize):
    B, S, H = hidden.shape
    gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
    status = ref.aligner_ref_steer_gate_v2(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(mask), mask.shape[1],
                                           _ptr(gate_in), _ptr(score_in), _ptr(weight), float(bias), int(tokens),
                                           int(normalize), _ptr(gate), _ptr(score))
    assert status == 0
    return gate, score


def _ref_gate_v3(ref, dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens, normalize):
    if not hasattr(ref, "aligner_ref_steer_gate_v3"):
        pytest.skip("the native build has no aligner_ref_steer_gate_v3: rebuild it")
    B, S, H = hidden.shape
    gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
    status = ref.aligner_ref_steer_gate_v3(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(mask), mask.shape[1],
                                           _ptr(gate_in), _ptr(score_in), _ptr(weight), _ptr(max_weight), float(bias),
                                           int(tokens), int(normalize), _ptr(gate), _ptr(score))
    assert status == 0
    return gate, score


def _ref_shift(ref, dtype, hidden, gate, vector, out=None):
    B, S, H = hidden.shape
    out = np.empty_like(hidden) if out is None else out
    assert ref.aligner_ref_steer_shift(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(gate), _ptr(vector), _ptr(out)) == 0
    return out


def _check_scores(score, want, magnitude, terms: int, what: str):
    """score (float32 sums) within the float32 rounding bound of the float64 oracle, non-finite where it is."""
    tolerance = 4.0 * (terms + 4) * EPS32 * np.asarray(magnitude, np.float64) + 1e-30
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(score), np.isnan(want)), f"{what}: NaN rows differ: {score} vs {want}"
    assert np.array_equal(score[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]), f"{what}: infinities"
    err = np.abs(score[finite].astype(np.float64) - want[finite].astype(np.float64))
    assert np.all(err <= tolerance[finite]), f"{what}: error {err.max():.3g} above {tolerance[finite].min():.3g}"
    return tolerance


def _check_gates(gate, score, want_gate, want_score, gate_in, tolerance, what: str):
    # The reference decides from its own score exactly as the contract says...
    decided = np.array([op_oracles.decide(float(g), float(s)) for g, s in zip(gate_in, score)], np.float32)
    np.testing.assert_array_equal(gate, decided, err_msg=f"{what}: decision from the reference's own score")
    # ...and agrees with the oracle's gate except where the two scores straddle zero within rounding.
    close_to_zero = np.isfinite(want_score) & (np.abs(want_score.astype(np.float64)) <= tolerance)
    assert np.all((gate == want_gate) | close_to_zero), f"{what}: gates {gate} vs oracle {want_gate}"


# --- SteerGate version 1 ---------------------------------------------------------------------------------------------

V1_CASES = [(d, p, H, S, past) for d in DTYPES for p in ("left", "right") for H in (7, 61, 64) for (S, past) in CALLS]


@pytest.mark.parametrize("dtype,padding,H,S,past", V1_CASES)
def test_gate_v1_matches_oracle(ref, dtype, padding, H, S, past):
    hidden, mask, gate_in = _case(dtype, padding, H, S, past)
    direction = _unit(np.random.default_rng(H), H)
    bias = np.float32(0.05)
    gate, score = _ref_gate_v1(ref, dtype, hidden, mask, gate_in, direction, bias)
    want_gate, want_score = op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, bias)
    _, magnitude = op_oracles.steer_gate_v1(_abs(hidden), mask, gate_in, _abs(direction), abs(float(bias)))
    tolerance = _check_scores(score, want_score, magnitude, H, "v1 score")
    _check_gates(gate, score, want_gate, want_score, gate_in, tolerance, "v1")


def test_last_valid_position_edges(ref):
    def last(row, S):
        row = np.asarray(row, dtype=np.int64)
        got = ref.aligner_ref_last_valid_position(_ptr(row), row.size, S)
        assert got == op_oracles.last_valid_position(row, S)
        return got

    assert last([1, 1, 0, 0], 4) == 1      # right padding
    assert last([0, 0, 1, 1], 4) == 3      # left padding
    assert last([0, 1, 1, 1], 1) == 0      # decode step
    assert last([1, 1, 0, 0], 2) == 0      # last token in the past: clamped
    assert last([0, 0, 0], 3) == 2         # no token: S - 1
    assert last([1, 2, 0], 3) == 0         # only a 1 counts as a token (§5: "whose mask is 1")


# --- SteerGate version 2 ---------------------------------------------------------------------------------------------

V2_CASES = [(d, p, H, S, past, K, norm) for d in DTYPES for p in ("left", "right") for H in (7, 64)
            for (S, past) in CALLS for K in (1, 3, 8) for norm in (0, 1)]


@pytest.mark.parametrize("dtype,padding,H,S,past,tokens,normalize", V2_CASES)
def test_gate_v2_matches_oracle(ref, dtype, padding, H, S, past, tokens, normalize):
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=2)
    rng = np.random.default_rng(100 + H + tokens)
    weight = (0.5 * rng.standard_normal(H)).astype(np.float32)  # version 2's weights are not unit
    score_in = rng.standard_normal(hidden.shape[0]).astype(np.float32)
    bias = np.float32(-0.2)
    gate, score = _ref_gate_v2(ref, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize)
    want_gate, want_score = op_oracles.steer_gate_v2(hidden, mask, gate_in, score_in, weight, bias, tokens,
                                                     bool(normalize))
    _, magnitude = op_oracles.steer_gate_v2(_abs(hidden), mask, gate_in, _abs(score_in), _abs(weight),
                                            abs(float(bias)), tokens, bool(normalize))
    tolerance = _check_scores(score, want_score, magnitude, H + tokens, "v2 score")
    _check_gates(gate, score, want_gate, want_score, gate_in, tolerance, "v2")


V3_CASES = [(d, p, H, S, past, K, norm) for d in DTYPES for p in ("left", "right") for H in (7, 64)
            for (S, past) in CALLS for K in (1, 3) for norm in (0, 1)]


@pytest.mark.parametrize("dtype,padding,H,S,past,tokens,normalize", V3_CASES)
def test_gate_v3_matches_oracle(ref, dtype, padding, H, S, past, tokens, normalize):
    """SteerGate version 3 (issue 18): the pooled mean plus the max over every valid position of the call; rows
    without a valid position (row 4, and row 5 after a past) read last_b; the max weight 0 gives version 2's score."""
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=3)
    rng = np.random.default_rng(200 + H + tokens)
    weight = (0.5 * rng.standard_normal(H)).astype(np.float32)
    max_weight = rng.standard_normal(H).astype(np.float32)
    score_in = rng.standard_normal(hidden.shape[0]).astype(np.float32)
    bias = np.float32(-0.2)
    gate, score = _ref_gate_v3(ref, dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens,
                               normalize)
    want_gate, want_score = op_oracles.steer_gate_v3(hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens,
                                                     bool(normalize))
    _, magnitude = op_oracles.steer_gate_v3(_abs(hidden), mask, gate_in, _abs(score_in), _abs(weight),
                                            _abs(max_weight), abs(float(bias)), tokens, bool(normalize))
    tolerance = _check_scores(score, want_score, magnitude, H + tokens, "v3 score")
    _check_gates(gate, score, want_gate, want_score, gate_in, tolerance, "v3")
    gate2, score2 = _ref_gate_v2(ref, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize)
    gate3, score3 = _ref_gate_v3(ref, dtype, hidden, mask, gate_in, score_in, weight, np.zeros(H, np.float32), bias,
                                 tokens, normalize)
    np.testing.assert_array_equal(score2, score3)
    np.testing.assert_array_equal(gate2, gate3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("S,past", CALLS)
def test_gate_v2_with_one_token_is_v1(ref, dtype, padding, S, past):
    """K = 1, normalize = 0, score_in = 0 and a unit weight: version 1 exactly (docs/contract.md). The reference sums
    the dot product in the same order for both versions, so it agrees bit for bit."""
    H = 61
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=3)
    direction = _unit(np.random.default_rng(5), H)
    bias = np.float32(-0.01)
    gate1, score1 = _ref_gate_v1(ref, dtype, hidden, mask, gate_in, direction, bias)
    zeros = np.zeros(hidden.shape[0], np.float32)
    gate2, score2 = _ref_gate_v2(ref, dtype, hidden, mask, gate_in, zeros, direction, bias, 1, 0)
    np.testing.assert_array_equal(score1.view(np.uint32), score2.view(np.uint32))
    np.testing.assert_array_equal(gate1, gate2)
    # The oracles agree with each other on the same inputs.
    o1 = op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, bias)
    o2 = op_oracles.steer_gate_v2(hidden, mask, gate_in, zeros, direction, bias, 1, False)
    np.testing.assert_array_equal(o1[0], o2[0])
    np.testing.assert_allclose(o1[1], o2[1], rtol=0, atol=1e-6)


def test_gate_v2_refuses_bad_attributes(ref):
    hidden, mask, gate_in = _case("fp32", "left", 4, 2, 0)
    B, S, H = hidden.shape
    out = np.empty(B, np.float32)
    weight, score_in = np.ones(H, np.float32), np.zeros(B, np.float32)
    for tokens, normalize in ((0, 0), (-2, 1), (1, 2), (1, -1)):
        status = ref.aligner_ref_steer_gate_v2(0, _ptr(hidden), B, S, H, _ptr(mask), mask.shape[1], _ptr(gate_in),
                                               _ptr(score_in), _ptr(weight), 0.0, tokens, normalize, _ptr(out),
                                               _ptr(out))
        assert status == -4, (tokens, normalize)


# --- non-finite scores steer -----------------------------------------------------------------------------------------

def _nonfinite_case(dtype):
    """Row b reads position S-1 (the mask is all ones); the hidden value there is NaN, +inf, -inf, NaN, -1, NaN, and
    the direction is e_0, so the scores are NaN, +inf, -inf, NaN, -1, NaN; gate_in: -1, -1, -1, 0, NaN, NaN."""
    B, S, H = 6, 3, 4
    hidden = np.zeros((B, S, H), np.float32)
    hidden[:, -1, 0] = [np.nan, np.inf, -np.inf, np.nan, -1.0, np.nan]
    mask = np.ones((B, S), np.int64)
    gate_in = np.array([-1, -1, -1, 0, np.nan, np.nan], np.float32)
    direction = np.array([1, 0, 0, 0], np.float32)
    return hidden.astype(_np_dtype(dtype)), mask, gate_in, direction


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_scores_steer(ref, dtype):
    hidden, mask, gate_in, direction = _nonfinite_case(dtype)
    want_gate = np.array([1, 1, 1, 0, 0, 1], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        gate, score = _ref_gate_v1(ref, dtype, hidden, mask, gate_in, direction, 0.0)
        oracle_gate, oracle_score = op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, 0.0)
        np.testing.assert_array_equal(gate, want_gate)
        np.testing.assert_array_equal(oracle_gate, want_gate)
        np.testing.assert_array_equal(score, oracle_score)  # NaN == NaN here, infinities exact
        assert np.isnan(score[0]) and score[1] == np.inf and score[2] == -np.inf

        # A NaN bias: every deciding row steers, whatever its hidden state.
        gate, _ = _ref_gate_v1(ref, dtype, np.zeros_like(hidden), mask, gate_in, direction, float("nan"))
        np.testing.assert_array_equal(gate, [1, 1, 1, 0, 1, 1])

        # Version 2, normalised and pooled over two tokens: the non-finite row term makes the score non-finite.
        zeros = np.zeros(hidden.shape[0], np.float32)
        gate, score = _ref_gate_v2(ref, dtype, hidden, mask, gate_in, zeros, direction, 0.0, 2, 1)
        oracle_gate, oracle_score = op_oracles.steer_gate_v2(hidden, mask, gate_in, zeros, direction, 0.0, 2, True)
        np.testing.assert_array_equal(gate, want_gate)
        np.testing.assert_array_equal(oracle_gate, want_gate)
        np.testing.assert_array_equal(np.isnan(score), np.isnan(oracle_score))

        # A non-finite score_in (the chain from the gate layers below) steers too.
        score_in = np.array([np.nan, np.inf, -np.inf, np.nan, -1.0, -np.inf], np.float32)
        gate, score = _ref_gate_v2(ref, dtype, np.zeros_like(hidden), mask, gate_in, score_in, direction, 0.0, 1, 0)
        np.testing.assert_array_equal(gate, want_gate)
        np.testing.assert_array_equal(score, score_in)


# --- SteerShift ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [7, 61, 64])
def test_shift_matches_oracle_bit_for_bit(ref, dtype, H):
    hidden, _, _ = _case(dtype, "left", H, 6, 0)
    rng = np.random.default_rng(H)
    vector = (4.0 * rng.standard_normal(H)).astype(np.float32)
    gate = np.array([1, 0, 1, 0, 0.5, -1], np.float32)
    out = _ref_shift(ref, dtype, hidden, gate, vector)
    want = op_oracles.steer_shift(hidden, gate, vector)
    np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    # Gate 0 rows come back bit for bit (the sign of zeros included); in place gives the same bytes.
    np.testing.assert_array_equal(out[gate == 0].view(np.uint8), hidden[gate == 0].view(np.uint8))
    in_place = hidden.copy()
    _ref_shift(ref, dtype, in_place, gate, vector, out=in_place)
    np.testing.assert_array_equal(in_place.view(np.uint8), out.view(np.uint8))


# --- against the ONNX functions run by ONNX Runtime ------------------------------------------------------------------

def _onnx_ops():
    pytest.importorskip("onnx")
    return pytest.importorskip("aligner_export.graph.onnx_ops", reason="aligner_export.graph.onnx_ops is not importable")


def _v2_node_builder(onnx_ops):
    """The exporter's SteerGate version-2 node builder, or None (with the reason) while it has none."""
    builder = getattr(onnx_ops, "make_steer_gate_v2_node", None)
    if builder is not None:
        return builder, ""
    legacy = getattr(onnx_ops, "make_steer_gate_node", None)
    if legacy is not None and "version" in inspect.signature(legacy).parameters:
        def build(hidden, attention_mask, gate_in, score_in, gate_out, score_out, weight, bias, tokens, normalize,
                  name):
            return legacy(hidden, attention_mask, gate_in, gate_out, score_out, weight, bias, name=name, version=2,
                          score_in=score_in, tokens=tokens, normalize=normalize)
        return build, ""
    return None, "aligner_export.graph.onnx_ops has no SteerGate version-2 node builder yet"


def _functions(onnx_ops, opset: int, gate_version: int):
    parameters = inspect.signature(onnx_ops.function_protos).parameters
    if gate_version == 1 and "gate_version" not in parameters:
        return onnx_ops.function_protos(opset)
    return onnx_ops.function_protos(opset, gate_version=gate_version)


def _onnx_model(op: str, dtype: str, H: int, node, gate_version: int = 1):
    onnx = pytest.importorskip("onnx")
    onnx_ops = _onnx_ops()
    from onnx import TensorProto, helper

    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    opset = 18
    hidden = helper.make_tensor_value_info("hidden", elem, ["B", "S", H])
    if op == "SteerGate":
        inputs = [hidden, helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
                  helper.make_tensor_value_info("gate_in", TensorProto.FLOAT, ["B"])]
        if gate_version >= 2:
            inputs.append(helper.make_tensor_value_info("score_in", TensorProto.FLOAT, ["B"]))
        outputs = [helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"]),
                   helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])]
        nodes = [node]
    else:
        inputs = [hidden, helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"])]
        outputs = [helper.make_tensor_value_info("out_f32", TensorProto.FLOAT, ["B", "S", H])]
        # ORT's Python API returns no bfloat16 arrays: widen SteerShift's output to float32 (exact for every dtype).
        nodes = [node, helper.make_node("Cast", ["out"], ["out_f32"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, op, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(onnx_ops.DOMAIN, gate_version)],
                              functions=_functions(onnx_ops, opset, gate_version))
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _ort_run(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's CPU provider lacks some bf16 kernels
        pytest.skip(f"ONNX Runtime cannot run this function for these dtypes: {str(exc).splitlines()[0][:160]}")
    from onnx import TensorProto

    values = {}
    for name, array in feeds.items():
        if array.dtype.name == "bfloat16":  # bfloat16 enters ORT as raw bits with an explicit ONNX type
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    outputs = session.run_with_ort_values([o.name for o in session.get_outputs()], values)
    return [o.numpy() for o in outputs]


def _with_nonfinite_row(hidden, mask):
    """The same case with row 0's last valid position set to NaN (its score is NaN: the gate must be 1)."""
    hidden = hidden.copy()
    S = hidden.shape[1]
    hidden[0, op_oracles.last_valid_position(mask[0], S)] = np.nan
    return hidden


ORT_CASES = [(d, p, H, S, past) for d in DTYPES for p in ("left", "right") for (H, S, past) in
             ((61, 6, 0), (61, 1, 3), (64, 4, 3), (7, 6, 0))]


@pytest.mark.parametrize("dtype,padding,H,S,past", ORT_CASES)
def test_reference_matches_onnx_functions_v1(ref, dtype, padding, H, S, past):
    onnx_ops = _onnx_ops()
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=1)
    hidden = _with_nonfinite_row(hidden, mask)
    rng = np.random.default_rng(7)
    direction, vector, bias = _unit(rng, H), (4.0 * rng.standard_normal(H)).astype(np.float32), np.float32(0.05)
    gate, score = _ref_gate_v1(ref, dtype, hidden, mask, gate_in, direction, bias)
    node = onnx_ops.make_steer_gate_node("hidden", "attention_mask", "gate_in", "gate", "score", direction,
                                         float(bias), name="/model/layers.0/steer/SteerGate")
    ort_gate, ort_score = _ort_run(_onnx_model("SteerGate", dtype, H, node),
                                   {"hidden": hidden, "attention_mask": mask, "gate_in": gate_in})
    np.testing.assert_allclose(score, ort_score, rtol=0, atol=1e-5 * np.sqrt(H))
    np.testing.assert_array_equal(gate, ort_gate)
    assert gate[0] == 1.0 and np.isnan(score[0]), "a NaN score steers"

    finite = np.isfinite(hidden.astype(np.float32)).all(axis=(1, 2))
    shift_gate = np.where(finite, gate, 0).astype(np.float32)
    out = _ref_shift(ref, dtype, hidden, shift_gate, vector)
    node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, name="/model/layers.0/steer/SteerShift")
    (ort_out,) = _ort_run(_onnx_model("SteerShift", dtype, H, node), {"hidden": hidden, "gate": shift_gate})
    # Same float32 math, same rounding to the storage dtype: equal values (the reference keeps -0.0 for gate 0
    # rows where the function's hidden + 0 gives +0.0, which compare equal; NaN rows compare as NaN).
    np.testing.assert_array_equal(out.astype(np.float32), np.asarray(ort_out).astype(np.float32))


ORT_V2_CASES = [(d, p, H, S, past, K, norm) for d in DTYPES for p in ("left", "right")
                for (H, S, past) in ((61, 6, 0), (64, 1, 3), (7, 4, 3)) for K in (1, 3, 8) for norm in (0, 1)]


@pytest.mark.parametrize("dtype,padding,H,S,past,tokens,normalize", ORT_V2_CASES)
def test_reference_matches_onnx_functions_v2(ref, dtype, padding, H, S, past, tokens, normalize):
    onnx_ops = _onnx_ops()
    builder, reason = _v2_node_builder(onnx_ops)
    if builder is None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=4)
    hidden = _with_nonfinite_row(hidden, mask)
    rng = np.random.default_rng(11 + H)
    weight = (0.5 * rng.standard_normal(H)).astype(np.float32)
    score_in = rng.standard_normal(hidden.shape[0]).astype(np.float32)
    bias = np.float32(0.1)
    gate, score = _ref_gate_v2(ref, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize)
    node = builder("hidden", "attention_mask", "gate_in", "score_in", "gate", "score", weight, float(bias), tokens,
                   bool(normalize), name="/model/layers.0/steer/SteerGate")
    ort_gate, ort_score = _ort_run(_onnx_model("SteerGate", dtype, H, node, gate_version=2),
                                   {"hidden": hidden, "attention_mask": mask, "gate_in": gate_in,
                                    "score_in": score_in})
    _, magnitude = op_oracles.steer_gate_v2(_abs(np.nan_to_num(hidden.astype(np.float32))), mask, gate_in,
                                            _abs(score_in), _abs(weight), abs(float(bias)), tokens, bool(normalize))
    tolerance = 2 * _check_scores(score, np.asarray(ort_score), magnitude, H + tokens, "v2 score vs ONNX function")
    _check_gates(gate, score, ort_gate, np.asarray(ort_score), gate_in, tolerance, "v2 vs ONNX function")
    assert gate[0] == 1.0 and math.isnan(score[0]), "a NaN score steers"


@pytest.mark.parametrize("dtype,padding,H,S,past,tokens,normalize",
                         [c for c in ORT_V2_CASES if c[5] in (1, 3)])
def test_reference_matches_onnx_functions_v3(ref, dtype, padding, H, S, past, tokens, normalize):
    """The C++ reference of SteerGate version 3 against its ONNX function run by ONNX Runtime, a NaN row included."""
    onnx_ops = _onnx_ops()
    hidden, mask, gate_in = _case(dtype, padding, H, S, past, seed=5)
    hidden = _with_nonfinite_row(hidden, mask)
    rng = np.random.default_rng(13 + H)
    weight = (0.5 * rng.standard_normal(H)).astype(np.float32)
    max_weight = rng.standard_normal(H).astype(np.float32)
    score_in = rng.standard_normal(hidden.shape[0]).astype(np.float32)
    bias = np.float32(0.1)
    gate, score = _ref_gate_v3(ref, dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens,
                               normalize)
    node = onnx_ops.make_steer_gate_v3_node("hidden", "attention_mask", "gate_in", "score_in", "gate", "score",
                                            weight, max_weight, float(bias), tokens, bool(normalize),
                                            name="/model/layers.0/steer/SteerGate")
    ort_gate, ort_score = _ort_run(_onnx_model("SteerGate", dtype, H, node, gate_version=3),
                                   {"hidden": hidden, "attention_mask": mask, "gate_in": gate_in,
                                    "score_in": score_in})
    _, magnitude = op_oracles.steer_gate_v3(_abs(np.nan_to_num(hidden.astype(np.float32))), mask, gate_in,
                                            _abs(score_in), _abs(weight), _abs(max_weight), abs(float(bias)), tokens,
                                            bool(normalize))
    tolerance = 2 * _check_scores(score, np.asarray(ort_score), magnitude, H + tokens, "v3 score vs ONNX function")
    _check_gates(gate, score, ort_gate, np.asarray(ort_score), gate_in, tolerance, "v3 vs ONNX function")
    assert gate[0] == 1.0 and math.isnan(score[0]), "a NaN score steers"
