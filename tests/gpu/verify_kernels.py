#!/usr/bin/env python3
"""Hand-run GPU check of the SteerGate (versions 1, 2 and 3) and SteerShift CUDA kernels, without TensorRT
(docs/architecture.md §8, docs/contract.md).

    make native && python tests/gpu/verify_kernels.py [--build build] [--dry-run]

1. Correctness on random shapes and dtypes (fp32/fp16/bf16; left/right padding; prefill, decode and chunks after a
   past; H not a multiple of 8; S beyond one block of 256 positions; misaligned rows, which send SteerShift down its
   scalar path; rows with no valid token, and rows whose tokens all lie in the past):
   - SteerGate version 1 and version 2 (K in {1, 4, 40}, normalize 0/1, random score_in) against the CPU reference
     (libaligner_ops_ref) and the numpy oracles (tests/op_oracles.py): scores within a float32-rounding bound computed
     per row (the oracle run on |hidden|, |weight|, |score_in|, |bias|), the gate equal to the decision on the kernel's
     own score and to the reference's gate except within that bound of 0, every gate written (NaN sentinels);
   - SteerGate version 3 (the pooled gate, issue 18: version 2 plus the max over every valid position) the same
     way, for K in {1, 4, 40} and normalize 0/1;
   - non-finite scores (NaN, +inf, -inf in the hidden state, in score_in, a NaN bias): every deciding row steers;
   - SteerShift bit for bit against the reference and the oracle, out of place and in place;
   - SteerShift version 2 ("norm") against the reference and the oracle within a rounding bound (the kernel reduces
     the sums of squares in another order), gate-0 rows bit for bit, in place equal to out of place.
2. Figures: SteerShift bandwidth against a device-to-device copy of the same bytes (target >= 80%), and the time of
   one SteerGate call (versions 1, 2 and 3).

Prints one table; exits 1 if a check fails. --dry-run runs everything but the GPU launches (the CPU reference stands in
for the kernels, and the kernel library is only checked for its entry points), so the script's own logic can be checked
on a machine without a GPU. Needs numpy and ml_dtypes (ctypes for CUDA). Runs in well under 2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import op_oracles  # noqa: E402  (the numpy oracles every implementation is compared with)

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bf16 cases are skipped and reported
    BF16 = None

STORAGE = {"fp32": 0, "fp16": 1, "bf16": 2}
H2D, D2H, D2D = 1, 2, 3
EPS32 = 2.0 ** -24
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def dtype_of(name):
    return {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": BF16}[name]


def ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


# --- libraries ---------------------------------------------------------------------------------------------------------

def load_reference(build: Path):
    path = build / "libaligner_ops_ref.so"
    if not path.is_file():
        sys.exit(f"verify_kernels: {path} not found (run `make native` first)")
    lib = ctypes.CDLL(str(path))
    lib.aligner_ref_steer_gate.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, F32, P, P]
    lib.aligner_ref_steer_gate_v2.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, P, F32, I64, I32, P, P]
    lib.aligner_ref_steer_gate_v3.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, P, P, F32, I64, I32, P, P]
    lib.aligner_ref_steer_shift.argtypes = [I32, P, I64, I64, I64, P, P, P]
    lib.aligner_ref_steer_shift_v2.argtypes = [I32, P, I64, I64, I64, P, P, P]
    for fn in (lib.aligner_ref_steer_gate, lib.aligner_ref_steer_gate_v2, lib.aligner_ref_steer_gate_v3,
               lib.aligner_ref_steer_shift, lib.aligner_ref_steer_shift_v2):
        fn.restype = I32
    return lib


def load_kernels(build: Path):
    path = build / "libaligner_kernels.so"
    if not path.is_file():
        sys.exit(f"verify_kernels: {path} not found (run `make native` on a machine with nvcc first)")
    lib = ctypes.CDLL(str(path))
    lib.aligner_kernel_steer_gate.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, F32, P, P, P]
    lib.aligner_kernel_steer_gate_v2.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, P, F32, I64, I32, P, P, P]
    lib.aligner_kernel_steer_gate_v3.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, P, P, F32, I64, I32, P, P, P]
    lib.aligner_kernel_steer_shift.argtypes = [I32, P, I64, I64, I64, P, P, P, P]
    lib.aligner_kernel_steer_shift_v2.argtypes = [I32, P, I64, I64, I64, P, P, P, P]
    for fn in (lib.aligner_kernel_steer_gate, lib.aligner_kernel_steer_gate_v2, lib.aligner_kernel_steer_gate_v3,
               lib.aligner_kernel_steer_shift, lib.aligner_kernel_steer_shift_v2):
        fn.restype = I32
    return lib


class Cuda:
    def __init__(self):
        for name in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"):
            if not name:
                continue
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            sys.exit("verify_kernels: cannot load the CUDA runtime (libcudart)")
        count = ctypes.c_int()
        if self.lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            sys.exit("verify_kernels: no CUDA device (use --dry-run to check everything but the launches)")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), P, P]
        self.lib.cudaMemcpy.argtypes = [P, P, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaMemset.argtypes = [P, ctypes.c_int, ctypes.c_size_t]
        self.lib.cudaMemcpyAsync.argtypes = [P, P, ctypes.c_size_t, ctypes.c_int, P]
        self.lib.cudaEventRecord.argtypes = [P, P]
        self.lib.cudaEventSynchronize.argtypes = [P]
        self.lib.cudaFree.argtypes = [P]
        self._bases = {}  # pointer handed out -> the allocation it lies in (misaligned uploads)

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(status).decode()}")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 16))), "cudaMalloc")
        return pointer.value

    def upload(self, array: np.ndarray, extra: int = 0) -> int:
        """A device copy of array, offset by extra bytes from an allocation (to force misalignment)."""
        array = np.ascontiguousarray(array)
        base = self.malloc(array.nbytes + extra)
        self.check(self.lib.cudaMemcpy(base + extra, array.ctypes.data, array.nbytes, H2D), "upload")
        self._bases[base + extra] = base
        return base + extra

    def download(self, pointer: int, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self.check(self.lib.cudaMemcpy(out.ctypes.data, pointer, out.nbytes, D2H), "download")
        return out

    def free(self, *pointers: int) -> None:
        for pointer in pointers:
            self.lib.cudaFree(self._bases.pop(pointer, pointer))

    def sync(self, what: str) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), what)

    def time_ms(self, fn, repeats: int) -> float:
        start, stop = ctypes.c_void_p(), ctypes.c_void_p()
        self.lib.cudaEventCreate(ctypes.byref(start))
        self.lib.cudaEventCreate(ctypes.byref(stop))
        fn()  # warm-up
        self.lib.cudaEventRecord(start, None)
        for _ in range(repeats):
            fn()
        self.lib.cudaEventRecord(stop, None)
        self.lib.cudaEventSynchronize(stop)
        ms = ctypes.c_float()
        self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, stop)
        return ms.value / repeats


# --- the operators on the CPU reference and on the GPU -------------------------------------------------------------

class Reference:
    """The CPU reference (libaligner_ops_ref): what the kernels must match."""

    def __init__(self, lib):
        self.lib = lib

    def gate_v1(self, dtype, hidden, mask, gate_in, direction, bias, misalign=False):
        B, S, H = hidden.shape
        gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
        assert self.lib.aligner_ref_steer_gate(STORAGE[dtype], ptr(hidden), B, S, H, ptr(mask), mask.shape[1],
                                               ptr(gate_in), ptr(direction), bias, ptr(gate), ptr(score)) == 0
        return gate, score

    def gate_v2(self, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize, misalign=False):
        B, S, H = hidden.shape
        gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
        assert self.lib.aligner_ref_steer_gate_v2(STORAGE[dtype], ptr(hidden), B, S, H, ptr(mask), mask.shape[1],
                                                  ptr(gate_in), ptr(score_in), ptr(weight), bias, tokens, normalize,
                                                  ptr(gate), ptr(score)) == 0
        return gate, score

    def gate_v3(self, dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens, normalize,
                misalign=False):
        B, S, H = hidden.shape
        gate, score = np.empty(B, np.float32), np.empty(B, np.float32)
        assert self.lib.aligner_ref_steer_gate_v3(STORAGE[dtype], ptr(hidden), B, S, H, ptr(mask), mask.shape[1],
                                                  ptr(gate_in), ptr(score_in), ptr(weight), ptr(max_weight), bias,
                                                  tokens, normalize, ptr(gate), ptr(score)) == 0
        return gate, score

    def shift(self, dtype, hidden, gate, vector, misalign=False, in_place=False, version=1):
        B, S, H = hidden.shape
        out = hidden.copy() if in_place else np.empty_like(hidden)
        source = out if in_place else hidden
        launch = self.lib.aligner_ref_steer_shift if version == 1 else self.lib.aligner_ref_steer_shift_v2
        assert launch(STORAGE[dtype], ptr(source), B, S, H, ptr(gate), ptr(vector), ptr(out)) == 0
        return out


class Kernels:
    """The CUDA kernels through their C entry points. Outputs are pre-filled with NaN sentinels."""

    def __init__(self, cuda: Cuda, lib):
        self.cuda, self.lib = cuda, lib

    def _gate(self, launch, B, what):
        cuda = self.cuda
        sentinel = np.full(B, np.nan, np.float32)
        d_gate, d_score = cuda.upload(sentinel), cuda.upload(sentinel)
        cuda.check(launch(d_gate, d_score), f"{what} launch")
        cuda.sync(what)
        gate, score = cuda.download(d_gate, sentinel), cuda.download(d_score, sentinel)
        cuda.free(d_gate, d_score)
        return gate, score

    def gate_v1(self, dtype, hidden, mask, gate_in, direction, bias, misalign=False):
        cuda = self.cuda
        B, S, H = hidden.shape
        offset = hidden.itemsize if misalign else 0
        d = [cuda.upload(hidden, offset), cuda.upload(mask), cuda.upload(gate_in), cuda.upload(direction)]
        result = self._gate(lambda g, s: self.lib.aligner_kernel_steer_gate(
            STORAGE[dtype], d[0], B, S, H, d[1], mask.shape[1], d[2], d[3], bias, g, s, None), B, "steer_gate")
        cuda.free(*d)
        return result

    def gate_v2(self, dtype, hidden, mask, gate_in, score_in, weight, bias, tokens, normalize, misalign=False):
        cuda = self.cuda
        B, S, H = hidden.shape
        offset = hidden.itemsize if misalign else 0
        d = [cuda.upload(hidden, offset), cuda.upload(mask), cuda.upload(gate_in), cuda.upload(score_in),
             cuda.upload(weight)]
        result = self._gate(lambda g, s: self.lib.aligner_kernel_steer_gate_v2(
            STORAGE[dtype], d[0], B, S, H, d[1], mask.shape[1], d[2], d[3], d[4], bias, tokens, normalize, g, s,
            None), B, "steer_gate_v2")
        cuda.free(*d)
        return result

    def gate_v3(self, dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias, tokens, normalize,
                misalign=False):
        cuda = self.cuda
        B, S, H = hidden.shape
        offset = hidden.itemsize if misalign else 0
        d = [cuda.upload(hidden, offset), cuda.upload(mask), cuda.upload(gate_in), cuda.upload(score_in),
             cuda.upload(weight), cuda.upload(max_weight)]
        result = self._gate(lambda g, s: self.lib.aligner_kernel_steer_gate_v3(
            STORAGE[dtype], d[0], B, S, H, d[1], mask.shape[1], d[2], d[3], d[4], d[5], bias, tokens, normalize, g,
            s, None), B, "steer_gate_v3")
        cuda.free(*d)
        return result

    def shift(self, dtype, hidden, gate, vector, misalign=False, in_place=False, version=1):
        cuda = self.cuda
        B, S, H = hidden.shape
        offset = hidden.itemsize if misalign else 0
        d_hidden, d_gate, d_vector = cuda.upload(hidden, offset), cuda.upload(gate), cuda.upload(vector)
        d_out = d_hidden if in_place else cuda.upload(np.full(hidden.shape, np.nan, np.float32).astype(hidden.dtype),
                                                      offset)
        launch = self.lib.aligner_kernel_steer_shift if version == 1 else self.lib.aligner_kernel_steer_shift_v2
        cuda.check(launch(STORAGE[dtype], d_hidden, B, S, H, d_gate, d_vector, d_out, None), "steer_shift launch")
        cuda.sync("steer_shift")
        out = cuda.download(d_out, hidden)
        cuda.free(d_hidden, d_gate, d_vector, *(() if in_place else (d_out,)))
        return out


# --- checks ------------------------------------------------------------------------------------------------------------

def score_bound(magnitude, terms: int):
    """The float32 rounding bound of a score whose float64 absolute-value sum is `magnitude` over `terms` terms."""
    return 4.0 * (terms + 4) * EPS32 * np.asarray(magnitude, np.float64) + 1e-30


def compare_gate(got, want, bound, gate_in):
    """(ok, worst |score error| / bound) of a (gate, score) pair against a wanted one."""
    gate, score = got
    want_gate, want_score = want
    if np.isnan(gate).any():  # a gate is never NaN: a NaN left means the kernel did not write it
        return False, math.inf
    if not np.array_equal(np.isnan(score), np.isnan(want_score)):
        return False, math.inf
    infinite = np.isinf(want_score)
    if not np.array_equal(score[infinite], want_score[infinite]):
        return False, math.inf
    finite = np.isfinite(want_score)
    ratio = np.abs(score[finite].astype(np.float64) - want_score[finite].astype(np.float64)) / (2 * bound[finite])
    worst = float(ratio.max()) if ratio.size else 0.0
    decided = np.array([op_oracles.decide(float(g), float(s)) for g, s in zip(gate_in, score)], np.float32)
    near_zero = finite & (np.abs(want_score.astype(np.float64)) <= 2 * bound)
    ok = worst <= 1.0 and np.array_equal(gate, decided) and bool(np.all((gate == want_gate) | near_zero))
    return ok, worst


def make_case(rng, dtype, B, S, H, past, padding):
    T = past + S
    hidden = (2.0 * rng.standard_normal((B, S, H))).astype(np.float32).astype(dtype_of(dtype))
    mask = np.zeros((B, T), np.int64)
    for b in range(B):
        n = int(rng.integers(1, T + 1))
        if b == B - 1:
            n = 0  # no valid token at all
        if padding == "left":
            mask[b, T - n:] = 1 if n else 0
        else:
            mask[b, :n] = 1
    if past and B > 2:
        mask[0] = 0
        mask[0, :past] = 1  # tokens only in the past: version 2 falls back to last_b
    gate_in = rng.choice(np.array([-1.0, -1.0, -1.0, 0.0, 1.0, np.nan], np.float32), size=B)
    return hidden, mask, gate_in


V2_VARIANTS = ((1, 0), (4, 1), (40, 0), (40, 1))


def check_case(device, reference, rng, dtype, B, S, H, past, padding, misalign):
    """One row of the table: SteerGate v1, v2 (every variant) and SteerShift on one random case."""
    hidden, mask, gate_in = make_case(rng, dtype, B, S, H, past, padding)
    magnitude_hidden = np.abs(hidden)
    ok = True

    direction = rng.standard_normal(H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    bias = float(np.float32(0.01))
    got = device.gate_v1(dtype, hidden, mask, gate_in, direction, bias, misalign)
    _, magnitude = op_oracles.steer_gate_v1(magnitude_hidden, mask, gate_in, np.abs(direction), abs(bias))
    bound = score_bound(magnitude, H)
    ok_ref, v1_ref = compare_gate(got, reference.gate_v1(dtype, hidden, mask, gate_in, direction, bias), bound,
                                  gate_in)
    ok_oracle, v1_oracle = compare_gate(got, op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, bias), bound,
                                        gate_in)
    ok &= ok_ref and ok_oracle

    v2_worst = 0.0
    for tokens, normalize in V2_VARIANTS:
        weight = (0.5 * rng.standard_normal(H)).astype(np.float32)
        score_in = rng.standard_normal(B).astype(np.float32)
        bias2 = float(np.float32(-0.05))
        got = device.gate_v2(dtype, hidden, mask, gate_in, score_in, weight, bias2, tokens, normalize, misalign)
        _, magnitude = op_oracles.steer_gate_v2(magnitude_hidden, mask, gate_in, np.abs(score_in), np.abs(weight),
                                                abs(bias2), tokens, bool(normalize))
        bound = score_bound(magnitude, H + tokens)
        want_ref = reference.gate_v2(dtype, hidden, mask, gate_in, score_in, weight, bias2, tokens, normalize)
        want_oracle = op_oracles.steer_gate_v2(hidden, mask, gate_in, score_in, weight, bias2, tokens, bool(normalize))
        ok_ref, worst_ref = compare_gate(got, want_ref, bound, gate_in)
        ok_oracle, worst_oracle = compare_gate(got, want_oracle, bound, gate_in)
        ok &= ok_ref and ok_oracle
        v2_worst = max(v2_worst, worst_ref, worst_oracle)

    v3_worst = 0.0
    for tokens, normalize in V2_VARIANTS:
        weight = (0.5 * rng.standard_normal(H)).astype(np.float32)
        max_weight = rng.standard_normal(H).astype(np.float32)
        score_in = rng.standard_normal(B).astype(np.float32)
        bias3 = float(np.float32(-0.05))
        got = device.gate_v3(dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias3, tokens, normalize,
                             misalign)
        _, magnitude = op_oracles.steer_gate_v3(magnitude_hidden, mask, gate_in, np.abs(score_in), np.abs(weight),
                                                np.abs(max_weight), abs(bias3), tokens, bool(normalize))
        bound = score_bound(magnitude, H + tokens)
        want_ref = reference.gate_v3(dtype, hidden, mask, gate_in, score_in, weight, max_weight, bias3, tokens,
                                     normalize)
        want_oracle = op_oracles.steer_gate_v3(hidden, mask, gate_in, score_in, weight, max_weight, bias3, tokens,
                                               bool(normalize))
        ok_ref, worst_ref = compare_gate(got, want_ref, bound, gate_in)
        ok_oracle, worst_oracle = compare_gate(got, want_oracle, bound, gate_in)
        ok &= ok_ref and ok_oracle
        v3_worst = max(v3_worst, worst_ref, worst_oracle)

    vector = (4.0 * rng.standard_normal(H)).astype(np.float32)
    shift_gate = rng.choice(np.array([0.0, 1.0, 1.0, 0.5], np.float32), size=B)
    want = reference.shift(dtype, hidden, shift_gate, vector)
    oracle = np.ascontiguousarray(op_oracles.steer_shift(hidden, shift_gate, vector))
    out = device.shift(dtype, hidden, shift_gate, vector, misalign)
    in_place = device.shift(dtype, hidden, shift_gate, vector, misalign, in_place=True)
    shift_exact = np.array_equal(out.view(np.uint8), want.view(np.uint8)) and \
        np.array_equal(out.view(np.uint8), oracle.view(np.uint8))
    in_place_exact = np.array_equal(in_place.view(np.uint8), want.view(np.uint8))
    ok &= shift_exact and in_place_exact

    norm_out = device.shift(dtype, hidden, shift_gate, vector, misalign, version=2)
    norm_in_place = device.shift(dtype, hidden, shift_gate, vector, misalign, in_place=True, version=2)
    norm_ok, norm_worst = compare_norm_shift(norm_out, reference.shift(dtype, hidden, shift_gate, vector, version=2),
                                             op_oracles.steer_shift_norm(hidden, shift_gate, vector), hidden,
                                             shift_gate, dtype)
    norm_ok &= np.array_equal(norm_in_place.view(np.uint8), norm_out.view(np.uint8))
    ok &= norm_ok
    return ok, max(v1_ref, v1_oracle), v2_worst, v3_worst, shift_exact, in_place_exact, norm_worst, norm_ok


# Half an ulp of the storage dtype, relative: a rescaled value may round to either neighbour.
STORAGE_ULP = {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}


def compare_norm_shift(got, want_ref, want_oracle, hidden, gate, dtype):
    """(ok, worst difference in units of the bound): per row, (2H float32 roundings of the sums + one storage ulp)
    times the row's largest value; gate-0 rows must be the input's bytes."""
    H = hidden.shape[-1]
    zero = np.asarray(gate) == 0
    ok = np.array_equal(got[zero].view(np.uint8), hidden[zero].view(np.uint8))
    worst = 0.0
    g = got.astype(np.float32)
    for want in (want_ref, want_oracle):
        w = np.asarray(want).astype(np.float32)
        bound = ((2 * H + 8) * EPS32 + STORAGE_ULP[dtype]) * np.abs(w).max(axis=-1, keepdims=True) + 1e-30
        with np.errstate(invalid="ignore"):
            worst = max(worst, float(np.nanmax(np.abs(g - w) / bound)) if g.size else 0.0)
    return ok and worst <= 1.0, worst


def check_nonfinite(device, reference, dtype):
    """Rows whose score is NaN, +inf or -inf steer (the decision of docs/contract.md), in every version (version 3:
    through its max term as well, whose NaN is kept)."""
    B, S, H = 6, 3, 40
    hidden = np.zeros((B, S, H), np.float32)
    hidden[:, -1, 0] = [np.nan, np.inf, -np.inf, np.nan, -1.0, np.nan]
    hidden = hidden.astype(dtype_of(dtype))
    mask = np.ones((B, S), np.int64)
    gate_in = np.array([-1, -1, -1, 0, np.nan, np.nan], np.float32)
    direction = np.zeros(H, np.float32)
    direction[0] = 1.0
    want = np.array([1, 1, 1, 0, 0, 1], np.float32)
    zeros = np.zeros(B, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        results = [
            device.gate_v1(dtype, hidden, mask, gate_in, direction, 0.0)[0],
            device.gate_v2(dtype, hidden, mask, gate_in, zeros, direction, 0.0, 2, 1)[0],
            device.gate_v2(dtype, np.zeros_like(hidden), mask, gate_in,
                           np.array([np.nan, np.inf, -np.inf, np.nan, -1.0, -np.inf], np.float32), direction, 0.0, 1,
                           0)[0],
        ]
        results.append(device.gate_v3(dtype, hidden, mask, gate_in, zeros, direction, direction, 0.0, 2, 0)[0])
        results.append(device.gate_v3(dtype, hidden, mask, gate_in, zeros, np.zeros(H, np.float32), direction, 0.0,
                                      1, 0)[0])
        nan_bias = device.gate_v1(dtype, np.zeros_like(hidden), mask, gate_in, direction, float("nan"))[0]
        oracle = op_oracles.steer_gate_v1(hidden, mask, gate_in, direction, 0.0)[0]
        cpu = reference.gate_v1(dtype, hidden, mask, gate_in, direction, 0.0)[0]
    ok = all(np.array_equal(r, want) for r in results) and np.array_equal(oracle, want) and \
        np.array_equal(cpu, want) and np.array_equal(nan_bias, [1, 1, 1, 0, 1, 1])
    return ok


# --- figures -----------------------------------------------------------------------------------------------------------

def shift_bandwidth(cuda, kernels, dtype, B, S, H, version=1):
    nbytes = B * S * H * dtype_of(dtype).itemsize
    d_in, d_out = cuda.malloc(nbytes), cuda.malloc(nbytes)
    cuda.lib.cudaMemset(d_in, 0, nbytes)
    d_gate, d_vector = cuda.upload(np.ones(B, np.float32)), cuda.upload(np.ones(H, np.float32))
    repeats = 20
    copy_ms = cuda.time_ms(lambda: cuda.lib.cudaMemcpyAsync(d_out, d_in, nbytes, D2D, None), repeats)
    launch = kernels.aligner_kernel_steer_shift if version == 1 else kernels.aligner_kernel_steer_shift_v2
    shift_ms = cuda.time_ms(lambda: launch(STORAGE[dtype], d_in, B, S, H, d_gate, d_vector, d_out, None), repeats)
    inplace_ms = cuda.time_ms(lambda: launch(STORAGE[dtype], d_in, B, S, H, d_gate, d_vector, d_in, None), repeats)
    cuda.free(d_in, d_out, d_gate, d_vector)
    gbps = lambda ms: 2 * nbytes / (ms * 1e-3) / 1e9  # one read and one write
    return gbps(copy_ms), gbps(shift_ms), gbps(inplace_ms)


def gate_time_us(cuda, kernels, dtype, B, S, H, tokens, normalize, version=2):
    """Microseconds per SteerGate call on a full mask (version 1 when tokens is None; else ``version`` 2 or 3)."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((B, S, H)).astype(np.float32).astype(dtype_of(dtype))
    d_hidden, d_mask = cuda.upload(hidden), cuda.upload(np.ones((B, S), np.int64))
    d_gate_in, d_score_in = cuda.upload(np.full(B, -1, np.float32)), cuda.upload(np.zeros(B, np.float32))
    d_weight, d_gate, d_score = cuda.upload(np.ones(H, np.float32)), cuda.malloc(4 * B), cuda.malloc(4 * B)
    if tokens is None:
        launch = lambda: kernels.aligner_kernel_steer_gate(STORAGE[dtype], d_hidden, B, S, H, d_mask, S, d_gate_in,
                                                           d_weight, 0.0, d_gate, d_score, None)
    elif version == 2:
        launch = lambda: kernels.aligner_kernel_steer_gate_v2(STORAGE[dtype], d_hidden, B, S, H, d_mask, S,
                                                              d_gate_in, d_score_in, d_weight, 0.0, tokens, normalize,
                                                              d_gate, d_score, None)
    else:  # the max weight is the same buffer: the time, not the value, is measured
        launch = lambda: kernels.aligner_kernel_steer_gate_v3(STORAGE[dtype], d_hidden, B, S, H, d_mask, S,
                                                              d_gate_in, d_score_in, d_weight, d_weight, 0.0, tokens,
                                                              normalize, d_gate, d_score, None)
    us = 1e3 * cuda.time_ms(launch, 50)
    cuda.free(d_hidden, d_mask, d_gate_in, d_score_in, d_weight, d_gate, d_score)
    return us


# --- main --------------------------------------------------------------------------------------------------------------

SHAPES = [  # (B, S, H, past)
    (1, 1, 576, 40),     # one decode step
    (3, 17, 61, 0),      # H not a multiple of 8
    (4, 128, 4096, 0),   # a 7B-size prefill
    (2, 1, 2048, 300),   # decode with a long past
    (5, 33, 7, 3),       # a chunk after a past, tiny H
    (3, 300, 64, 0),     # S beyond one block: version 2's scan takes several chunks
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="CMake build directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="everything but the GPU launches: the CPU reference stands in for the kernels")
    args = parser.parse_args()
    started = time.time()
    reference = Reference(load_reference(args.build))
    kernels = load_kernels(args.build)  # the entry points must exist either way
    if args.dry_run:
        cuda, device = None, reference
        print("dry run: the CPU reference stands in for the kernels; no GPU launch\n")
    else:
        cuda = Cuda()
        device = Kernels(cuda, kernels)
    rng = np.random.default_rng(args.seed)

    dtypes = [d for d in ("fp32", "fp16", "bf16") if dtype_of(d) is not None]
    rows, failures = [], 0
    for dtype in dtypes:
        for (B, S, H, past) in SHAPES:
            for padding in ("left", "right"):
                for misalign in (False, True):
                    ok, v1, v2, v3, shift, in_place, norm, _ = check_case(device, reference, rng, dtype, B, S, H, past,
                                                                      padding, misalign)
                    failures += not ok
                    rows.append((f"{dtype} B{B} S{S} H{H} past{past} {padding}{' misaligned' if misalign else ''}",
                                 f"{v1:.2f}", f"{v2:.2f}", f"{v3:.2f}", "yes" if shift else "NO",
                                 "yes" if in_place else "NO", f"{norm:.2f}", "ok" if ok else "FAIL"))
        ok = check_nonfinite(device, reference, dtype)
        failures += not ok
        rows.append((f"{dtype} NaN/inf scores and NaN bias steer", "-", "-", "-", "-", "-", "-",
                     "ok" if ok else "FAIL"))
    if BF16 is None:
        rows.append(("bf16", "-", "-", "-", "-", "-", "-", "skipped: pip install ml_dtypes"))

    print("score and norm columns: worst |kernel - (reference, oracle)| in units of the rounding bound (<= 1 passes)")
    print(f"{'case':<46} {'v1 score':>8} {'v2 score':>8} {'v3 score':>8} {'shift':>6} {'inplace':>7} {'norm':>6}  "
          "result")
    for row in rows:
        print(f"{row[0]:<46} {row[1]:>8} {row[2]:>8} {row[3]:>8} {row[4]:>6} {row[5]:>7} {row[6]:>6}  {row[7]}")

    if cuda is not None:
        print(f"\n{'SteerShift bandwidth (GB/s, read+write)':<46} {'D2D copy':>9} {'shift':>9} {'in place':>9}  "
              "shift/copy")
        for dtype, (B, S, H) in (("fp16", (8, 2048, 4096)), ("bf16", (8, 2048, 4096)), ("fp32", (4, 2048, 4096))):
            if dtype_of(dtype) is None:
                continue
            for version in (1, 2):
                copy, shift, in_place = shift_bandwidth(cuda, kernels, dtype, B, S, H, version)
                verdict = "meets 80%" if shift >= 0.8 * copy else "BELOW 80%"
                label = f"{dtype} B{B} S{S} H{H}" + (" norm (v2)" if version == 2 else "")
                print(f"{label:<46} {copy:>9.1f} {shift:>9.1f} {in_place:>9.1f}  {shift / copy:>5.0%} {verdict}")
        print(f"\n{'SteerGate time per call (us), fp16 B8 S2048 H4096':<46} {'us':>9}")
        for label, tokens, normalize, version in (
                ("version 1", None, 0, 1), ("version 2, K=1", 1, 0, 2), ("version 2, K=8, normalize", 8, 1, 2),
                ("version 2, K=64, normalize", 64, 1, 2), ("version 3, K=8, normalize", 8, 1, 3)):
            us = gate_time_us(cuda, kernels, 'fp16', 8, 2048, 4096, tokens, normalize, version)
            print(f"{label:<46} {us:>9.1f}")
    else:
        print("\nfigures (bandwidth, time per call): not measured in a dry run")
    print(f"\n{len(rows)} correctness rows, {failures} failed; {time.time() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
