#!/usr/bin/env python3
"""Hand-run GPU check of the SteerGate/SteerShift CUDA kernels, without TensorRT (issue 5, ARCHITECTURE.md §8).

    make native && python tests/gpu/verify_kernels.py [--build build]

1. Correctness: random shapes and dtypes (fp32/fp16/bf16, left/right padding, H not a multiple of 8, misaligned
   rows that take the scalar path); relative error against a float64 numpy reference; every output element written
   (outputs are pre-filled with a NaN sentinel); in place, gate-0 rows untouched.
2. Bandwidth: SteerShift (out of place and in place, gate 1) against cudaMemcpy device-to-device of the same bytes;
   the target is >= 80% of copy bandwidth.
Prints one summary table; exits 1 if a correctness check fails. Needs numpy and ml_dtypes only (ctypes for CUDA).
Runs in well under 3 minutes on an Orin or an H100.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import time
from pathlib import Path

import numpy as np

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bf16 cases are skipped and reported
    BF16 = None

ROOT = Path(__file__).resolve().parents[2]
STORAGE = {"fp32": 0, "fp16": 1, "bf16": 2}
H2D, D2H, D2D = 1, 2, 3


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
            sys.exit("verify_kernels: no CUDA device")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        self.lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                             ctypes.c_void_p]
        self.lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(status).decode()}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 16))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ptr)

    def upload(self, array: np.ndarray, extra: int = 0) -> int:
        """A device copy of array, optionally offset by extra bytes (to force misalignment)."""
        ptr = self.malloc(array.nbytes + extra) + extra
        self.check(self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, H2D), "upload")
        return ptr

    def download(self, ptr: int, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self.check(self.lib.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, D2H), "download")
        return out

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


def load_kernels(build: Path):
    path = build / "libaligner_kernels.so"
    if not path.is_file():
        sys.exit(f"verify_kernels: {path} not found (run `make native` on this machine first)")
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.aligner_kernel_steer_gate.argtypes = [i32, p, i64, i64, i64, p, i64, p, p, p, p, p, p]
    lib.aligner_kernel_steer_shift.argtypes = [i32, p, i64, i64, i64, p, p, p, p]
    return lib


def dtype_of(name):
    return {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": BF16}[name]


def check_case(cuda, kernels, rng, dtype, B, S, H, past, padding, misalign):
    T = past + S
    hidden = rng.standard_normal((B, S, H)).astype(np.float32).astype(dtype_of(dtype))
    direction = rng.standard_normal(H).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vector = (4 * rng.standard_normal(H)).astype(np.float32)
    bias = np.array([0.01], np.float32)
    mask = np.zeros((B, T), np.int64)
    for b in range(B):
        n = int(rng.integers(0, T + 1))
        mask[b, T - n:] = 1 if padding == "left" else 0
        if padding == "right":
            mask[b, :n] = 1
    gate_in = rng.choice(np.array([-1.0, -1.0, 0.0, 1.0], np.float32), size=B)

    # Misaligned: element-aligned but not 16-byte aligned, which sends SteerShift down its scalar path.
    offset = hidden.itemsize if misalign else 0
    d_hidden = cuda.upload(hidden, extra=offset)
    d_mask, d_gate_in = cuda.upload(mask), cuda.upload(gate_in)
    d_direction, d_vector, d_bias = cuda.upload(direction), cuda.upload(vector), cuda.upload(bias)
    sentinel = np.full(B, np.nan, np.float32)
    d_gate, d_score = cuda.upload(sentinel), cuda.upload(sentinel)
    cuda.check(kernels.aligner_kernel_steer_gate(STORAGE[dtype], d_hidden, B, S, H, d_mask, T, d_gate_in,
                                                 d_direction, d_bias, d_gate, d_score, None), "steer_gate launch")
    cuda.check(cuda.lib.cudaDeviceSynchronize(), "steer_gate")
    gate, score = cuda.download(d_gate, sentinel), cuda.download(d_score, sentinel)

    # float64 reference (§5)
    ref_score = np.empty(B)
    for b in range(B):
        valid = np.flatnonzero(mask[b] == 1)
        last = min(max((valid[-1] if valid.size else T - 1) - past, 0), S - 1)
        ref_score[b] = hidden[b, last].astype(np.float64) @ direction.astype(np.float64) + float(bias[0])
    ref_gate = np.where(gate_in >= 0, gate_in, (ref_score > 0).astype(np.float32))
    score_err = float(np.max(np.abs(score - ref_score)) / max(1e-6, float(np.max(np.abs(ref_score)))))
    near_zero = np.abs(ref_score) < 1e-4
    gate_ok = bool(np.all((gate == ref_gate) | near_zero)) and not np.isnan(gate).any()

    out_sentinel = np.full(hidden.shape, np.nan, np.float32).astype(hidden.dtype)
    d_out = cuda.upload(out_sentinel, extra=offset)
    d_gate_for_shift = cuda.upload(ref_gate.astype(np.float32))
    cuda.check(kernels.aligner_kernel_steer_shift(STORAGE[dtype], d_hidden, B, S, H, d_gate_for_shift, d_vector,
                                                  d_out, None), "steer_shift launch")
    cuda.check(cuda.lib.cudaDeviceSynchronize(), "steer_shift")
    out = cuda.download(d_out, hidden)
    exact = hidden.astype(np.float64) + ref_gate.astype(np.float64)[:, None, None] * vector
    all_written = not np.isnan(out.astype(np.float32)).any()
    rel = float(np.max(np.abs(out.astype(np.float64) - exact) / (np.abs(exact) + 1e-3)))
    # In place: gate-0 rows unchanged byte for byte.
    cuda.check(kernels.aligner_kernel_steer_shift(STORAGE[dtype], d_hidden, B, S, H, d_gate_for_shift, d_vector,
                                                  d_hidden, None), "steer_shift in place")
    cuda.check(cuda.lib.cudaDeviceSynchronize(), "steer_shift in place")
    in_place = cuda.download(d_hidden, hidden)
    zero = ref_gate == 0
    in_place_ok = np.array_equal(in_place.view(np.uint8), out.view(np.uint8)) and \
        np.array_equal(in_place[zero].view(np.uint8), hidden[zero].view(np.uint8))
    for ptr in (d_hidden, d_out):
        cuda.free(ptr - offset)
    for ptr in (d_mask, d_gate_in, d_direction, d_vector, d_bias, d_gate, d_score, d_gate_for_shift):
        cuda.free(ptr)
    tolerance = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 8e-3}[dtype]
    ok = score_err < 1e-4 and gate_ok and all_written and rel <= tolerance and in_place_ok
    return ok, score_err, rel, all_written, in_place_ok


def bandwidth(cuda, kernels, dtype, B, S, H):
    elem = dtype_of(dtype).itemsize
    nbytes = B * S * H * elem
    d_in, d_out = cuda.malloc(nbytes), cuda.malloc(nbytes)
    cuda.lib.cudaMemset(d_in, 0, nbytes)
    d_gate = cuda.upload(np.ones(B, np.float32))
    d_vector = cuda.upload(np.ones(H, np.float32))
    repeats = 20
    copy_ms = cuda.time_ms(lambda: cuda.lib.cudaMemcpyAsync(d_out, d_in, nbytes, D2D, None), repeats)
    shift_ms = cuda.time_ms(lambda: kernels.aligner_kernel_steer_shift(STORAGE[dtype], d_in, B, S, H, d_gate,
                                                                       d_vector, d_out, None), repeats)
    inplace_ms = cuda.time_ms(lambda: kernels.aligner_kernel_steer_shift(STORAGE[dtype], d_in, B, S, H, d_gate,
                                                                         d_vector, d_in, None), repeats)
    for ptr in (d_in, d_out, d_gate, d_vector):
        cuda.free(ptr)
    gbps = lambda ms: 2 * nbytes / (ms * 1e-3) / 1e9  # one read and one write
    return gbps(copy_ms), gbps(shift_ms), gbps(inplace_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="CMake build directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cuda = Cuda()
    kernels = load_kernels(args.build)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    dtypes = [d for d in ("fp32", "fp16", "bf16") if dtype_of(d) is not None]
    rows, failures = [], 0
    shapes = [(1, 1, 576, 40), (3, 17, 61, 0), (4, 128, 4096, 0), (2, 1, 2048, 300), (5, 33, 7, 3)]
    for dtype in dtypes:
        for (B, S, H, past) in shapes:
            for padding in ("left", "right"):
                for misalign in (False, True):
                    ok, score_err, rel, written, in_place = check_case(cuda, kernels, rng, dtype, B, S, H, past,
                                                                       padding, misalign)
                    failures += not ok
                    rows.append((f"{dtype} B{B} S{S} H{H} past{past} {padding}{' misaligned' if misalign else ''}",
                                 f"{score_err:.1e}", f"{rel:.1e}", "yes" if written else "NO",
                                 "yes" if in_place else "NO", "ok" if ok else "FAIL"))
    if BF16 is None:
        rows.append(("bf16", "-", "-", "-", "-", "skipped: pip install ml_dtypes"))

    print(f"{'case':<44} {'score rel':>9} {'shift rel':>9} {'written':>7} {'inplace':>7}  result")
    for row in rows:
        print(f"{row[0]:<44} {row[1]:>9} {row[2]:>9} {row[3]:>7} {row[4]:>7}  {row[5]}")

    print(f"\n{'SteerShift bandwidth (GB/s, read+write)':<44} {'D2D copy':>9} {'shift':>9} {'in place':>9}  shift/copy")
    for dtype, (B, S, H) in (("fp16", (8, 2048, 4096)), ("bf16", (8, 2048, 4096)), ("fp32", (4, 2048, 4096))):
        if dtype_of(dtype) is None:
            continue
        copy, shift, in_place = bandwidth(cuda, kernels, dtype, B, S, H)
        verdict = "meets 80%" if shift >= 0.8 * copy else "BELOW 80%"
        print(f"{dtype + f' B{B} S{S} H{H}':<44} {copy:>9.1f} {shift:>9.1f} {in_place:>9.1f}  "
              f"{shift / copy:>5.0%} {verdict}")
    print(f"\n{len(rows)} correctness cases, {failures} failed; {time.time() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
