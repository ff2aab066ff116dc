"""plugins/common CPU reference (libaligner_ops_ref, via ctypes) against numpy and against the ONNX functions of
``aligner_export.onnx_ops`` executed by ONNX Runtime (ARCHITECTURE.md §5, §8).

The numpy side is written independently of the C++ code: float64 sums, ml_dtypes for bfloat16 rounding, numpy's own
float16. The library comes from the CMake build (``ALIGNER_NATIVE_BUILD``, default ``build/``); without it the tests
skip and say so.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STORAGE = {"fp32": 0, "fp16": 1, "bf16": 2}


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


def _case(dtype: str, padding: str, H: int, past: int, seed: int = 0):
    rng = np.random.default_rng(seed + H + 7 * past + (padding == "left"))
    B = 5
    S = 1 if past else 9
    T = past + S
    hidden = rng.standard_normal((B, S, H)).astype(np.float32).astype(_np_dtype(dtype))
    direction = rng.standard_normal(H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vector = (4.0 * rng.standard_normal(H)).astype(np.float32)
    mask = np.zeros((B, T), dtype=np.int64)
    lengths = [1 + (3 * b) % T for b in range(B)]
    lengths[-1] = 0  # a row with no valid token at all
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    gate_in = np.array([-1, -1, 0, 1, -1], dtype=np.float32)
    return hidden, mask, gate_in, direction, np.float32(0.05), vector


def _numpy_gate(hidden, mask, gate_in, direction, bias):
    B, S, _ = hidden.shape
    T = mask.shape[1]
    score = np.zeros(B)
    for b in range(B):
        valid = np.flatnonzero(mask[b] == 1)
        t_star = valid[-1] if valid.size else T - 1
        last = min(max(t_star - (T - S), 0), S - 1)
        score[b] = hidden[b, last].astype(np.float64) @ direction.astype(np.float64) + float(bias)
    gate = np.where(gate_in >= 0, gate_in, (score > 0).astype(np.float32))
    return gate.astype(np.float32), score


def _numpy_shift(hidden, gate, vector):
    exact = hidden.astype(np.float64) + gate.astype(np.float64)[:, None, None] * vector.astype(np.float64)
    return exact


def _run_ref_gate(ref, dtype, hidden, mask, gate_in, direction, bias):
    B, S, H = hidden.shape
    gate = np.empty(B, np.float32)
    score = np.empty(B, np.float32)
    status = ref.aligner_ref_steer_gate(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(mask), mask.shape[1],
                                        _ptr(gate_in), _ptr(direction), float(bias), _ptr(gate), _ptr(score))
    assert status == 0
    return gate, score


def _run_ref_shift(ref, dtype, hidden, gate, vector, out=None):
    B, S, H = hidden.shape
    out = np.empty_like(hidden) if out is None else out
    assert ref.aligner_ref_steer_shift(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(gate), _ptr(vector), _ptr(out)) == 0
    return out


ULP = {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
CASES = [(d, p, H, past) for d in ("fp32", "fp16", "bf16") for p in ("left", "right") for H in (7, 61, 64)
         for past in (0, 3)]


@pytest.mark.parametrize("dtype,padding,H,past", CASES)
def test_reference_matches_numpy(ref, dtype, padding, H, past):
    hidden, mask, gate_in, direction, bias, vector = _case(dtype, padding, H, past)
    gate, score = _run_ref_gate(ref, dtype, hidden, mask, gate_in, direction, bias)
    want_gate, want_score = _numpy_gate(hidden, mask, gate_in, direction, bias)
    np.testing.assert_allclose(score, want_score, rtol=0, atol=1e-5 * np.sqrt(H))
    # The gate decision can only differ where float32 and float64 scores straddle zero; none do here.
    assert np.all(np.abs(want_score) > 1e-4) or np.array_equal(gate, want_gate)
    np.testing.assert_array_equal(gate, want_gate)

    out = _run_ref_shift(ref, dtype, hidden, gate, vector)
    exact = _numpy_shift(hidden, gate, vector)
    got = out.astype(np.float64)
    # One rounding to the storage dtype after a float32 computation: within one ulp of the exact value.
    np.testing.assert_array_less(np.abs(got - exact), ULP[dtype] * np.abs(exact) + 1e-6)
    # Cast of the float32 result with numpy's/ml_dtypes' own rounding gives the same bits.
    f32 = hidden.astype(np.float32) + gate[:, None, None] * vector
    expect = np.where(gate[:, None, None] == 0, hidden, f32.astype(hidden.dtype))
    np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(expect).view(np.uint8))
    # Gate 0 rows come back bit for bit; in place gives the same bytes.
    zero_rows = gate == 0
    assert zero_rows.any()
    np.testing.assert_array_equal(out[zero_rows].view(np.uint8), hidden[zero_rows].view(np.uint8))
    in_place = hidden.copy()
    _run_ref_shift(ref, dtype, in_place, gate, vector, out=in_place)
    np.testing.assert_array_equal(in_place.view(np.uint8), out.view(np.uint8))


def test_last_valid_position_edges(ref):
    def last(row, S):
        row = np.asarray(row, dtype=np.int64)
        return ref.aligner_ref_last_valid_position(_ptr(row), row.size, S)

    assert last([1, 1, 0, 0], 4) == 1      # right padding
    assert last([0, 0, 1, 1], 4) == 3      # left padding
    assert last([0, 1, 1, 1], 1) == 0      # decode step
    assert last([1, 1, 0, 0], 2) == 0      # last token in the past: clamped
    assert last([0, 0, 0], 3) == 2         # no token: S - 1
    assert last([1, 2, 0], 3) == 0         # only a 1 counts as a token (§5: "whose mask is 1")


# --- against the ONNX functions run by ONNX Runtime -----------------------------------------------------------------

ORT_DTYPES = ("fp32", "fp16", "bf16")


def _onnx_model(op: str, dtype: str, H: int, direction, bias, vector):
    onnx = pytest.importorskip("onnx")
    onnx_ops = pytest.importorskip("aligner_export.onnx_ops", reason="aligner_export.onnx_ops is not importable")
    from onnx import TensorProto, helper

    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    opset = 18
    hidden = helper.make_tensor_value_info("hidden", elem, ["B", "S", H])
    if op == "SteerGate":
        node = onnx_ops.make_steer_gate_node("hidden", "attention_mask", "gate_in", "gate", "score", direction,
                                             float(bias), name="/model/layers.0/steer/SteerGate")
        inputs = [hidden, helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
                  helper.make_tensor_value_info("gate_in", TensorProto.FLOAT, ["B"])]
        outputs = [helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"]),
                   helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])]
    else:
        node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, name="/model/layers.0/steer/SteerShift")
        inputs = [hidden, helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"])]
        outputs = [helper.make_tensor_value_info("out_f32", TensorProto.FLOAT, ["B", "S", H])]
    # ORT's Python API returns no bfloat16 arrays: widen SteerShift's output to float32 (exact for every dtype).
    nodes = [node] if op == "SteerGate" else [node, helper.make_node("Cast", ["out"], ["out_f32"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, op, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(onnx_ops.DOMAIN, 1)],
                              functions=onnx_ops.function_protos(opset))
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


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("H,past", [(61, 0), (61, 3), (64, 0), (7, 2)])
def test_reference_matches_onnx_functions(ref, dtype, padding, H, past):
    hidden, mask, gate_in, direction, bias, vector = _case(dtype, padding, H, past, seed=1)
    gate, score = _run_ref_gate(ref, dtype, hidden, mask, gate_in, direction, bias)
    ort_gate, ort_score = _ort_run(_onnx_model("SteerGate", dtype, H, direction, bias, vector),
                                   {"hidden": hidden, "attention_mask": mask, "gate_in": gate_in})
    np.testing.assert_allclose(score, ort_score, rtol=0, atol=1e-5 * np.sqrt(H))
    np.testing.assert_array_equal(gate, ort_gate)

    out = _run_ref_shift(ref, dtype, hidden, gate, vector)
    (ort_out,) = _ort_run(_onnx_model("SteerShift", dtype, H, direction, bias, vector), {"hidden": hidden, "gate": gate})
    # Same float32 math, same rounding to the storage dtype: equal values (the reference keeps -0.0 for gate 0
    # rows where the function's hidden + 0 gives +0.0, which compare equal).
    np.testing.assert_array_equal(out.astype(np.float32), np.asarray(ort_out).astype(np.float32))
