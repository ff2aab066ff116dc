"""TensorRT backend: a serialized engine from ``aligner-export build`` plus the steering plugin library.

Written against the TensorRT 10 Python API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``,
optimization profile 0) with device memory from cuda-python. ``tensorrt`` and ``cuda`` are imported only here, so the
rest of the run-time works where TensorRT is absent.

The engine's stamp ``ENGINE.json`` sits beside it and holds ``trt_version``, ``compute_capability`` and
``manifest_sha256`` (of the export dir's ``inferaligner.json`` the engine was built from); an engine is only valid
for the TensorRT version and GPU it was built on, and only for that export's steering configuration, so all three are
checked on load.

The KV cache makes a round trip through host memory on every step (the generation loop is backend-neutral and works
on numpy arrays); the C API (``runtime/c/``) is the path that keeps it on the device.

Thread safety: one execution context serves every call, so ``run`` is serialised with a lock.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from ..contract import ATTENTION_MASK, LOGITS, STAMP_FILE, StampKey
from ..errors import AlignerError
from ..integrity import verify_plugin_constants

PLUGIN_ENV = "ALIGNER_TRT_PLUGINS"


def import_tensorrt():
    """The ``tensorrt`` module, or one line saying that TensorRT is missing and what to do instead. Checked before the
    engine path, so that a machine without TensorRT hears that first, not that some engine file is absent."""
    try:
        # deferred: TensorRT exists only on NVIDIA machines that have it installed
        import tensorrt as trt
    except ImportError:
        raise AlignerError("TensorRT is not installed here: --backend tensorrt runs an engine that 'aligner-export "
                           "build --model OUTDIR --plugins LIB -o ENGINE' builds on a machine with TensorRT and an "
                           "NVIDIA GPU (JetPack ships both; elsewhere pip install \"inferaligner-edge[tensorrt]\"); "
                           "without TensorRT, run the export directory with --backend onnxruntime") from None
    return trt


def read_stamp(engine_path: Path) -> dict:
    stamp_file = engine_path.parent / STAMP_FILE
    if not stamp_file.is_file():
        raise AlignerError(f"engine {engine_path} has no {STAMP_FILE} stamp beside it (build it with aligner-export build)")
    try:
        stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignerError(f"cannot read {stamp_file}: {exc}") from None
    required = (StampKey.TRT_VERSION, StampKey.COMPUTE_CAPABILITY, StampKey.MANIFEST_SHA256)
    missing = [k for k in required if k not in stamp]
    if missing:
        raise AlignerError(f"{stamp_file} lacks {', '.join(missing)}")
    return stamp


def _normalise_cc(value) -> str:
    if isinstance(value, (list, tuple)):
        return ".".join(str(v) for v in value)
    text = str(value).lower().removeprefix("sm_").removeprefix("sm")
    if "." not in text and len(text) >= 2:
        text = f"{text[:-1]}.{text[-1]}"
    return text


def _import_cuda_runtime():
    try:
        # deferred: cuda-python comes with the tensorrt extra only (>= 12.6 names the module cuda.bindings)
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            # deferred: the same module under cuda-python < 12.6's name
            from cuda import cudart
        except ImportError:
            raise AlignerError("the tensorrt backend needs cuda-python (pip install 'inferaligner-edge[tensorrt]')") \
                from None
    return cudart


class _PluginDigests:
    """The plugin library's registry of the constants digests of the plugins it created at run time
    (``aligner_plugins_digest_*``, plugins/tensorrt/README: "Constant digests")."""

    def __init__(self, library: ctypes.CDLL):
        try:
            self._reset, self._count, self._at = (library.aligner_plugins_digest_reset,
                                                  library.aligner_plugins_digest_count,
                                                  library.aligner_plugins_digest_at)
        except AttributeError:
            raise AlignerError("the plugin library has no digest registry: rebuild it from this version of the "
                               "package") from None
        self._count.restype = ctypes.c_int32
        text = ctypes.POINTER(ctypes.c_char_p)
        self._at.argtypes = [ctypes.c_int32, text, text, text, text]
        self._at.restype = ctypes.c_int32

    def reset(self) -> None:
        self._reset()

    def entries(self) -> list[tuple[str, str, str, str]]:
        out = []
        for i in range(self._count()):
            fields = [ctypes.c_char_p() for _ in range(4)]
            if self._at(i, *[ctypes.byref(f) for f in fields]) != 0:
                raise AlignerError("the plugin library's digest registry changed while it was read")
            out.append(tuple((f.value or b"").decode("utf-8", "replace") for f in fields))
        return out


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, manifest_sha256: str, plugin_library: str | Path | None = None,
                 integrity: dict | None = None):
        trt = import_tensorrt()
        self._trt = trt
        self._cudart = cudart = _import_cuda_runtime()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise AlignerError(f"engine not found: {engine_path}")
        stamp = read_stamp(engine_path)
        if stamp[StampKey.TRT_VERSION] != trt.__version__:
            raise AlignerError(f"engine {engine_path} was built with TensorRT {stamp['trt_version']}; this is "
                               f"TensorRT {trt.__version__} (rebuild it here)")
        device = self._call(cudart.cudaGetDevice())
        props = self._call(cudart.cudaGetDeviceProperties(device))
        here = f"{props.major}.{props.minor}"
        if _normalise_cc(stamp[StampKey.COMPUTE_CAPABILITY]) != here:
            raise AlignerError(f"engine {engine_path} was built for compute capability {stamp['compute_capability']}; "
                               f"this GPU is {here} (rebuild it here)")
        if stamp[StampKey.MANIFEST_SHA256] != manifest_sha256:
            raise AlignerError(f"engine {engine_path} was built from another export (manifest_sha256 differs)")
        engine_bytes = engine_path.read_bytes()
        if StampKey.ENGINE_SHA256 not in stamp:
            raise AlignerError(f"{engine_path.parent / STAMP_FILE} lacks engine_sha256 (rebuild the engine with this "
                               f"version of aligner-export build)")
        if hashlib.sha256(engine_bytes).hexdigest() != stamp[StampKey.ENGINE_SHA256]:
            raise AlignerError(f"engine {engine_path} differs from the one its stamp was written for (tampered or "
                               f"replaced engine)")

        plugin_library = plugin_library or stamp.get("plugin_library") or os.environ.get(PLUGIN_ENV)
        if plugin_library:
            if not Path(plugin_library).is_file():
                raise AlignerError(f"plugin library not found: {plugin_library}")
            # RTLD_GLOBAL: the library registers SteerGate/SteerShift with TensorRT's plugin registry on load.
            self._plugin_handle = ctypes.CDLL(str(plugin_library), mode=ctypes.RTLD_GLOBAL)
            digests = _PluginDigests(self._plugin_handle)
            digests.reset()
        else:
            digests = None
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise AlignerError(f"TensorRT cannot deserialize {engine_path} (plugin library missing or mismatched?)")
        if integrity is not None:
            # The plugins recorded the digest of the constants they deserialised (docs/contract.md).
            if digests is None:
                raise AlignerError("the steering constants of the engine can only be checked with the plugin library "
                                   "loaded by this backend (pass plugins=... or set ALIGNER_TRT_PLUGINS)")
            verify_plugin_constants(digests.entries(), integrity)
        self.context = self.engine.create_execution_context()
        self._stream = self._call(cudart.cudaStreamCreate())
        self.context.set_optimization_profile_async(0, self._stream)

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self._profile_max = {n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2]) for n in self.input_names}
        vocab = self._shapes.get(LOGITS, (None,))[-1]
        self.vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else None
        mask_max = self._profile_max.get(ATTENTION_MASK)
        self.context_length = mask_max[1] if mask_max else None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._lock = threading.Lock()

    def _call(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                self._call(self._cudart.cudaFree(pointer))
            capacity = max(nbytes, 2 * capacity, 256)  # grow geometrically: the KV cache grows one token a step
            pointer = self._call(self._cudart.cudaMalloc(capacity))
            self._buffers[name] = (pointer, capacity)
        return pointer

    def past_spec(self, name: str) -> tuple[int, int, np.dtype]:
        shape = self._shapes[name]
        return shape[1], shape[3], self._dtypes[name]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            staged = []
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                limit = self._profile_max[name]
                if any(d > m for d, m in zip(array.shape, limit)):
                    raise AlignerError(f"input {name} of shape {array.shape} exceeds the engine's optimization "
                                       f"profile (max {limit}); rebuild the engine with a larger profile")
                self.context.set_input_shape(name, array.shape)
                pointer = self._buffer(name, array.nbytes)
                if array.nbytes:
                    self._call(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self._stream))
                self.context.set_tensor_address(name, pointer)
                staged.append(array)  # keep host memory alive until the stream is synchronised
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=self._dtypes[name])
                self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
                outputs[name] = host
            if not self.context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for name, host in outputs.items():
                if host.nbytes:
                    self._call(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h,
                                                      self._stream))
            self._call(cudart.cudaStreamSynchronize(self._stream))
        return outputs

    def __del__(self):
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for pointer, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(pointer)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
