"""Thin InferAligner run-time: runs an export directory on ONNX Runtime or an engine on TensorRT.

Never imports torch (docs/architecture.md §2): a Jetson installs this package without the ``export`` extra.
``Aligner`` is imported lazily so that ``aligner_runtime.errors`` etc. stay import-light.
"""

__version__ = "0.1.0"

from .errors import AlignerError  # noqa: E402

__all__ = ["AlignerError", "Aligner", "GenerationResult", "__version__"]


def __getattr__(name):
    if name in ("Aligner", "GenerationResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'aligner_runtime' has no attribute {name!r}")
