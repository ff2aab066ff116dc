"""Backends run one forward step of an exported graph; the loop in ``generate.py`` does the rest.

- ``onnxruntime``: an export dir's ``model.onnx`` on the CPU, CUDA or TensorRT execution provider.
- ``tensorrt``: a serialized engine built by ``aligner-export build`` (imports ``tensorrt`` only there).
"""

from ..contract.choices import BACKENDS  # noqa: F401  (the names callers import from here)
