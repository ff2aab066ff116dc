"""ONNX Runtime backend. ``InferenceSession.run`` is thread-safe, so concurrent generations run unserialised."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AlignerError, check_count, max_threads

# Short names accepted by the API and ``aligner-run --provider``.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def resolve_providers(providers) -> list:
    """Maps short names to ORT provider names; entries may be ``(name, options)`` pairs as ORT accepts them."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    resolved = []
    for entry in providers or ["cpu"]:
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
    import onnxruntime as ort

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
        raise AlignerError(f"ONNX Runtime cannot load {model_path}: {str(exc).splitlines()[0]}") from None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, providers=None, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None):
        self.session = session_for(model_path, providers, intra_op_threads, inter_op_threads)
        self.providers = self.session.get_providers()
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(self._inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None:
            raise AlignerError(f"{model_path} has no 'logits' output: not a causal LM export")
        vocab = logits.shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def past_spec(self, name: str) -> tuple[int, int, np.dtype]:
        info = self._inputs[name]
        heads, head_dim = info.shape[1], info.shape[3]
        dtype = _DTYPES.get(info.type)
        if dtype is None or not isinstance(heads, int) or not isinstance(head_dim, int):
            raise AlignerError(f"unsupported past input {name}: {info.type} {info.shape}")
        return heads, head_dim, np.dtype(dtype)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
