"""SteerShift version 2 ("norm", issue 17) in plugins/common's CPU reference (``aligner_ref_steer_shift_v2``, via
ctypes) against the numpy oracle of ``tests/op_oracles.py`` and against the ONNX function run by ONNX Runtime, in
float32, float16 and bfloat16, prefill and decode shapes, mixed gates in one batch (docs/contract.md "SteerShift
version 2"). The library comes from the CMake build (``ALIGNER_NATIVE_BUILD``, default ``build/``); without it the
tests skip and say so."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import op_oracles
from test_plugins_common import DTYPES, STORAGE, _np_dtype, _onnx_ops, _ort_run, _ptr, ref  # noqa: F401 (ref: fixture)

# Storage rounding (half an ulp) plus float32 sums over H; per dtype, relative to the row's largest value.
ROUNDING = {"fp32": 1e-5, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
GATES = np.array([1.0, 0.0, 3.0, 0.0, 0.5, -1.0], np.float32)  # mixed in one batch, a negative one included


@pytest.fixture(scope="module")
def ref_v2(ref):  # noqa: F811 (the fixture of test_plugins_common)
    if not hasattr(ref, "aligner_ref_steer_shift_v2"):
        pytest.fail("libaligner_ops_ref has no aligner_ref_steer_shift_v2: rebuild it")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    ref.aligner_ref_steer_shift_v2.argtypes = [i32, p, i64, i64, i64, p, p, p]
    ref.aligner_ref_steer_shift_v2.restype = i32
    return ref


def _shift_v2(lib, dtype, hidden, gate, vector, out=None):
    B, S, H = hidden.shape
    out = np.empty_like(hidden) if out is None else out
    status = lib.aligner_ref_steer_shift_v2(STORAGE[dtype], _ptr(hidden), B, S, H, _ptr(gate), _ptr(vector), _ptr(out))
    assert status == 0
    return out


def _hidden(dtype, S, H, seed):
    rng = np.random.default_rng(seed)
    hidden = (2.0 * rng.standard_normal((len(GATES), S, H))).astype(np.float32).astype(_np_dtype(dtype))
    return hidden, (4.0 * rng.standard_normal(H)).astype(np.float32)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.abs(want).max(axis=-1, keepdims=True)
    assert np.all(np.abs(got - want) <= ROUNDING[dtype] * scale + 1e-30), \
        f"max difference {np.abs(got - want).max():.3g} over the rounding bound"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [7, 61, 64])
@pytest.mark.parametrize("S", [6, 1], ids=["prefill", "decode"])
def test_reference_matches_oracle(ref_v2, dtype, H, S):
    hidden, vector = _hidden(dtype, S, H, seed=H + S)
    out = _shift_v2(ref_v2, dtype, hidden, GATES, vector)
    _close(out, op_oracles.steer_shift_norm(hidden, GATES, vector), dtype)
    # the norm of every position is the one before the shift; steered rows moved
    before = np.linalg.norm(hidden.astype(np.float32), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float32), axis=-1), before, rtol=4 * ROUNDING[dtype])
    assert np.abs(out[0].astype(np.float32) - hidden[0].astype(np.float32)).max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_zero_rows_are_bit_identical_and_in_place_agrees(ref_v2, dtype):
    hidden, vector = _hidden(dtype, 5, 33, seed=3)
    hidden[1, 0, :2] = [-0.0, np.nan]  # the sign of a zero and a NaN come back as they were
    out = _shift_v2(ref_v2, dtype, hidden, GATES, vector)
    zero = GATES == 0
    np.testing.assert_array_equal(out[zero].view(np.uint8), hidden[zero].view(np.uint8))
    in_place = hidden.copy()
    _shift_v2(ref_v2, dtype, in_place, GATES, vector, out=in_place)
    np.testing.assert_array_equal(in_place.view(np.uint8), out.view(np.uint8))


def test_degenerate_rows(ref_v2):
    """A zero state stays zero; a shift that cancels the state gives zeros, not NaN (the 1e-6 floor on ‖y‖)."""
    H = 8
    vector = np.arange(1, H + 1, dtype=np.float32)
    hidden = np.zeros((2, 1, H), np.float32)
    hidden[1, 0] = -vector
    out = _shift_v2(ref_v2, "fp32", hidden, np.ones(2, np.float32), vector)
    np.testing.assert_array_equal(out, np.zeros_like(out))


def test_bad_arguments_are_refused(ref_v2):
    hidden, vector = _hidden("fp32", 2, 4, seed=0)
    out = np.empty_like(hidden)
    call = ref_v2.aligner_ref_steer_shift_v2
    assert call(7, _ptr(hidden), 6, 2, 4, _ptr(GATES), _ptr(vector), _ptr(out)) == -1
    assert call(0, _ptr(hidden), -1, 2, 4, _ptr(GATES), _ptr(vector), _ptr(out)) == -2
    assert call(0, _ptr(hidden), 6, 0, 4, _ptr(GATES), _ptr(vector), _ptr(out)) == -2
    assert call(0, None, 6, 2, 4, _ptr(GATES), _ptr(vector), _ptr(out)) == -3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,S", [(61, 6), (64, 1), (7, 4)])
def test_reference_matches_onnx_function(ref_v2, dtype, H, S):
    onnx = pytest.importorskip("onnx")
    onnx_ops = _onnx_ops()
    from onnx import TensorProto, helper

    hidden, vector = _hidden(dtype, S, H, seed=11 * H + S)
    out = _shift_v2(ref_v2, dtype, hidden, GATES, vector)
    node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, "/model/layers.0/steer/SteerShift", 2)
    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    graph = helper.make_graph(
        [node, helper.make_node("Cast", ["out"], ["out_f32"], to=TensorProto.FLOAT)], "shift",
        [helper.make_tensor_value_info("hidden", elem, ["B", "S", H]),
         helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("out_f32", TensorProto.FLOAT, ["B", "S", H])])
    imports = [helper.make_opsetid("", 18), helper.make_opsetid(onnx_ops.DOMAIN, 2)]
    model = helper.make_model(graph, opset_imports=imports, functions=onnx_ops.function_protos(18, 1, 2))
    model.ir_version = 10
    onnx.checker.check_model(model)
    (ort_out,) = _ort_run(model, {"hidden": hidden, "gate": GATES})
    _close(ort_out, out, dtype)
    zero = GATES == 0  # gate-0 rows: the same bits on both sides
    np.testing.assert_array_equal(np.asarray(ort_out)[zero], out[zero].astype(np.float32))
