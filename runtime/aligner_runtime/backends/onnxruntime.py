"""ONNX Runtime backend. ``InferenceSession.run`` is thread-safe, so concurrent generations run unserialised.

The KV cache (issue 11) never goes through numpy per step: each generation gets an :class:`OrtKV` whose buffers are
bound with ORT's I/O binding, as the next step's past and, for graphs that allow it, as the present too.

- **Shared buffer** (``GroupQueryAttention``, as the onnxruntime-genai builder emits it): one buffer per past input,
  ``[B, kv_heads, capacity, head_dim]``, allocated once for the whole generation and bound as both
  ``past_key_values.*`` and ``present.*``; the kernel writes each step's keys in place at each row's length
  (``seqlens_k``), so a decode step costs the same whatever the context. Such graphs take right-padded batches.
- **Growing** (optimum graphs, whose attention concatenates past and new keys): the presents stay ORT-allocated
  ``OrtValue`` s that the next step binds as its past; no numpy copy, no host round trip on a GPU provider.

Only the logits of the last position and the gate outputs come back to the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import ATTENTION_MASK, GATE_OUT, INPUTS_EMBEDS, INPUT_IDS, LOGITS, SCORE_OUT, is_past, present_name
from ..errors import AlignerError, check_count, max_threads
from ..generate import KV_FEED
from ..onnx_graph import read_graph_summary
from ..schema import first_line

# Short names accepted by the API and ``aligner-run --provider``.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def import_ort():
    """``onnxruntime``, from whichever wheel is installed: ``onnxruntime`` (CPU) or ``onnxruntime-gpu`` (CUDA,
    TensorRT EP); the two conflict, so the package takes one through its ``cpu`` or ``gpu`` extra."""
    try:
        # deferred: onnxruntime is an optional extra (cpu or gpu wheel); the contract and manifest work without it
        import onnxruntime
    except ImportError:
        raise AlignerError("ONNX Runtime is not installed: pip install 'inferaligner-edge[cpu]' (onnxruntime) or "
                           "'inferaligner-edge[gpu]' (onnxruntime-gpu)") from None
    return onnxruntime


def default_providers(available: list[str]) -> list[str]:
    """With no providers asked for: the CUDA EP when this ONNX Runtime has it (onnxruntime-gpu on a GPU machine;
    fp16 and int4 graphs run there), else the CPU. The TensorRT EP is used only when asked for: it builds an engine
    per input shape at first use, and it has no kernels for MatMulNBits or GroupQueryAttention (those nodes fall
    back to the CUDA EP), so it is not a silent default."""
    return ["cuda"] if "CUDAExecutionProvider" in available else ["cpu"]


def resolve_providers(providers) -> list:
    """Maps short names to ORT provider names; entries may be ``(name, options)`` pairs as ORT accepts them."""
    ort = import_ort()

    available = ort.get_available_providers()
    resolved = []
    for entry in providers or default_providers(available):
        name, options = (entry if isinstance(entry, tuple) else (entry, None))
        full = PROVIDERS.get(str(name).lower(), name)
        if full not in available:
            raise AlignerError(f"ONNX Runtime provider '{name}' is not available here (available: "
                               f"{', '.join(available)})")
        resolved.append((full, options) if options else full)
    # The CPU provider stays last as the fallback for ops another provider does not take.
    if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in resolved]:
        resolved.append("CPUExecutionProvider")
    return resolved


def session_for(model_path: str | Path, providers=None, intra_op_threads: int | None = None,
                inter_op_threads: int | None = None):
    """An ``InferenceSession`` with full graph optimisation; a graph ORT cannot load is an :class:`AlignerError`."""
    ort = import_ort()

    for what, value in (("threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        if value is not None:
            check_count(value, f"{what} (0 = ONNX Runtime's default)", 0, max_threads())
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=resolve_providers(providers))
    except AlignerError:
        raise
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid graphs
        raise AlignerError(f"ONNX Runtime cannot load {model_path}: {first_line(exc)}") from None


def _ort_device(providers: list[str]) -> tuple[str, int]:
    """Where the KV cache lives: on the GPU when the first provider is CUDA or TensorRT, else on the host."""
    first = providers[0] if providers else "CPUExecutionProvider"
    return ("cuda", 0) if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else ("cpu", 0)


class OrtKV:
    """One generation's KV cache for :class:`OnnxRuntimeBackend` (see the module docstring).

    ``values[past_name]`` is the ``OrtValue`` bound as that past input; on the host it wraps ``arrays[past_name]``
    without a copy (shared mode) so that row edits (the two-pass prefill, compaction) are plain numpy on the same
    memory. ``length`` is the number of positions written (the graph's past length in growing mode)."""

    bound = True

    def __init__(self, backend: "OnnxRuntimeBackend", batch: int, capacity: int | None,
                 arrays: dict[str, np.ndarray] | None = None, length: int = 0):
        ort = import_ort()

        self.backend = backend
        self.batch = batch
        self.shared = backend.shares_kv_buffer
        self.capacity = capacity
        self.length = length
        self.device = backend.kv_device
        if arrays is None:
            arrays = {}
            for name in backend.past_names:
                heads, head_dim, dtype = backend.past_spec(name)
                width = (capacity or 0) if self.shared else 0
                arrays[name] = np.zeros((batch, heads, width, head_dim), dtype=dtype)
        self.arrays = arrays
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array, *self.device) for name, array in arrays.items()}
        self._binding = None

    def binding(self, session):
        """The I/O binding of this cache, made once per cache. A shared cache binds its buffers as past and present
        once, for every step; a growing cache rebinds them on the same binding each step (its presents are new
        tensors; a fresh ``io_binding()`` per step cost ~1 ms of Python on SmolLM2's 60 KV tensors)."""
        if self._binding is None:
            self._binding = session.io_binding()
            if self.shared:
                for past, value in self.values.items():
                    self._binding.bind_ortvalue_input(past, value)
                    self._binding.bind_ortvalue_output(self.backend.present_of[past], value)
        return self._binding

    # --- the loop's cache protocol (aligner_runtime.generate) -----------------------------------------------------
    def feed(self, feeds: dict) -> None:
        feeds[KV_FEED] = self

    def take(self, outputs: dict) -> None:
        """Nothing to do: :meth:`OnnxRuntimeBackend._run` updated the cache in place."""

    def _host(self) -> dict[str, np.ndarray]:
        """The cache as numpy arrays: our own arrays where we hold them, else views of ORT's buffers (a copy for
        device buffers). An ``OrtValue`` made from a numpy array does not own that memory, so its ``numpy()`` view
        must never outlive ``arrays``: handing it out let ``replace_rows`` rebuild the cache on freed memory (a
        segmentation fault in the next step after a row-grouped prefill with fired rows)."""
        if self.device[0] != "cpu":
            return {name: value.numpy() for name, value in self.values.items()}
        return {name: self.arrays[name] if name in self.arrays else value.numpy()
                for name, value in self.values.items()}

    @property
    def contiguous(self) -> bool:
        """A shared buffer holds each row's keys from position 0 (the loop then only counts the mask's ones)."""
        return self.shared

    def keep(self, rows, drop: int = 0) -> "OrtKV":
        """The cache of ``rows``, without its first ``drop`` positions (a growing cache only)."""
        idx = np.asarray(rows, dtype=np.int64)
        if drop and self.shared:
            raise ValueError("a shared KV buffer keeps its positions")
        return OrtKV(self.backend, len(idx), self.capacity, {k: np.ascontiguousarray(v[idx][:, :, drop:])
                                                             for k, v in self._host().items()}, self.length - drop)

    def replace_rows(self, rows, other: "OrtKV") -> None:
        if other.length != self.length and not self.shared:
            raise ValueError("KV caches of different lengths")
        host, theirs = self._host(), other._host()  # own memory on the host, or fresh copies of it
        for name in host:
            host[name][rows] = theirs[name]
        self.__init__(self.backend, self.batch, self.capacity, host, self.length)

    @classmethod
    def join(cls, parts: list["OrtKV"], side: str = "left") -> "OrtKV":
        """The rows of every part, in order. A growing part shorter than the longest gains masked zero positions on
        ``side``; shared buffers are widened on the right to the largest capacity (each row's keys stay where they
        are, from position 0)."""
        if len(parts) == 1:
            return parts[0]
        # after a step a growing cache's buffers are ORT's presents (``values``), no longer ``arrays``: take every
        # part's whole cache from the host view
        first, hosts = parts[0], [p._host() for p in parts]
        capacity = max((p.capacity or 0) for p in parts) or first.capacity
        width = max(next(iter(h.values())).shape[2] for h in hosts) if hosts[0] else 0
        pad_side = "right" if first.shared else side
        arrays = {name: np.concatenate([_pad_positions(host[name], width, pad_side) for host in hosts], axis=0)
                  for name in hosts[0]}
        return cls(first.backend, sum(p.batch for p in parts), capacity, arrays, max(p.length for p in parts))


def _pad_positions(array: np.ndarray, width: int, side: str) -> np.ndarray:
    """A cache array ``[B, kvh, P, hd]`` with zero positions added on ``side`` up to ``width``."""
    missing = width - array.shape[2]
    if missing <= 0:
        return array
    zeros = np.zeros((array.shape[0], array.shape[1], missing, array.shape[3]), array.dtype)
    return np.concatenate([zeros, array] if side == "left" else [array, zeros], axis=2)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, providers=None, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None):
        self.session = session_for(model_path, providers, intra_op_threads, inter_op_threads)
        self.providers = self.session.get_providers()
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(self._inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._out_dtypes = {o.name: np.dtype(_DTYPES.get(o.type) or np.float32) for o in self.session.get_outputs()}
        logits = next((o for o in self.session.get_outputs() if o.name == LOGITS), None)
        if logits is None:
            raise AlignerError(f"{model_path} has no 'logits' output: not a causal LM export")
        vocab = logits.shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self.past_names = [n for n in self.input_names if is_past(n)]
        self._present = {present_name(n): n for n in self.past_names if present_name(n) in self.output_names}
        self.present_of = {past: present for present, past in self._present.items()}
        ops = _op_types(model_path)
        # GroupQueryAttention writes each step's keys into the past buffer at each row's length: past and present
        # may be one buffer, and rows must be right-padded (their keys contiguous from position 0).
        self.shares_kv_buffer = "GroupQueryAttention" in ops and len(self._present) == len(self.past_names)
        self.padding_side = "right" if "GroupQueryAttention" in ops else "left"
        self.kv_device = _ort_device(self.providers)

    def kv_cache(self, batch: int, capacity: int | None = None) -> OrtKV:
        """A new, empty KV cache for ``batch`` rows; ``capacity``: positions a shared buffer must hold."""
        if self.shares_kv_buffer and not capacity:
            raise AlignerError("a shared KV buffer needs its capacity (prompt width + new tokens)")
        return OrtKV(self, batch, capacity)

    def past_spec(self, name: str) -> tuple[int, int, np.dtype]:
        info = self._inputs[name]
        heads, head_dim = info.shape[1], info.shape[3]
        dtype = _DTYPES.get(info.type)
        if dtype is None or not isinstance(heads, int) or not isinstance(head_dim, int):
            raise AlignerError(f"unsupported past input {name}: {info.type} {info.shape}")
        return heads, head_dim, np.dtype(dtype)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cache = feeds.get(KV_FEED)
        if cache is None:
            outputs = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, outputs))
        return self._run_bound({k: v for k, v in feeds.items() if k != KV_FEED}, cache)

    def _run_bound(self, feeds: dict[str, np.ndarray], cache: OrtKV) -> dict[str, np.ndarray]:
        """One step with I/O binding: the cache's buffers as past (and, shared, as present: bound once for the whole
        generation); the presents of a growing cache stay ORT-allocated on the cache's device and become its
        buffers. The logits, gate and score are written straight into numpy arrays. Returns those outputs."""
        ort = import_ort()
        binding = cache.binding(self.session)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if not cache.shared:
            for name, value in cache.values.items():
                binding.bind_ortvalue_input(name, value)
        rows, width = _call_shape(feeds)
        result, fetched = {}, False
        for name in self.output_names:
            past = self._present.get(name)
            if past is not None:
                if not cache.shared:
                    binding.bind_output(name, *cache.device)
                    fetched = True
                continue
            shape = self._host_shape(name, rows, width)
            if shape is None:
                binding.bind_output(name, "cpu")
                fetched = True
            else:
                result[name] = np.empty(shape, dtype=self._out_dtypes[name])
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(result[name]))
        self.session.run_with_iobinding(binding)
        if fetched:
            for name, value in zip(self.output_names, binding.get_outputs()):  # every output, in bound order
                past = self._present.get(name)
                if past is None:
                    if name not in result:
                        result[name] = value.numpy()
                elif not cache.shared:  # growing cache: ORT's present becomes the next step's past, where it lies
                    cache.values[past] = value
                    cache.arrays.pop(past, None)
        cache.length = feeds[ATTENTION_MASK].shape[1] if ATTENTION_MASK in feeds else cache.length
        return result

    def _host_shape(self, name: str, rows: int, width: int) -> tuple | None:
        """The shape of a host output known before the run (logits, the gate outputs), else None."""
        if name == LOGITS and self.vocab_size:
            return (rows, width, self.vocab_size)
        if name in (GATE_OUT, SCORE_OUT):
            return (rows,)
        return None

def _call_shape(feeds: dict) -> tuple[int, int]:
    """``(rows, positions)`` of this call, from ``input_ids`` or ``inputs_embeds``."""
    tokens = feeds.get(INPUT_IDS)
    if tokens is None:
        tokens = feeds[INPUTS_EMBEDS]
    return int(tokens.shape[0]), int(tokens.shape[1])


def _op_types(model_path) -> set[str]:
    """The graph's op types, read from the protobuf headers (weights not loaded)."""
    try:
        return {node.op_type for node in read_graph_summary(model_path).nodes}
    except AlignerError:
        return set()
