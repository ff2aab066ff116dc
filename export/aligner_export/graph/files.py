"""Writing and checking ONNX files: weights in an external data file past protobuf's 2 GB limit, and
``onnx.checker`` with ``full_check`` (shape inference included), its failure as one clear error."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from aligner_runtime.errors import AlignerError

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom for the graph itself


def initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_ir(ir_model, path: Path) -> None:
    """Saves an onnx-ir model, its weights beside it in ``<name>_data`` when they pass :data:`EXTERNAL_DATA_BYTES`."""
    if initializer_bytes(ir_model) > EXTERNAL_DATA_BYTES:
        ir.save(ir_model, str(path), external_data=path.name + "_data")
    else:
        ir.save(ir_model, str(path))


def save_proto(model, path: Path) -> None:
    """Saves a ``ModelProto`` by the same rule as :func:`save_ir`."""
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + "_data" if large else None)


def passes_checker(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check_graph(path: Path) -> None:
    """:class:`AlignerError` with the checker's first line when the steered graph at ``path`` fails it."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise AlignerError(f"the steered graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
