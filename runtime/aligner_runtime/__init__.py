"""Thin InferAligner run-time: runs an export directory on ONNX Runtime or an engine on TensorRT.

Never imports torch (docs/architecture.md §2): a Jetson installs this package without the ``export`` extra.
"""

__version__ = "0.1.0"

from .api import Aligner, GenerationResult  # noqa: E402
from .errors import AlignerError  # noqa: E402

__all__ = ["AlignerError", "Aligner", "GenerationResult", "__version__"]
