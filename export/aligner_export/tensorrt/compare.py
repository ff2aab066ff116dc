"""ONNX Runtime against TensorRT for an export directory and its engine, on Polygraphy's comparator.

One prefill step (a random prompt, left padding on all rows but the first, ``steer_gate_in = -1``, empty past) goes
to both; every output is compared with Polygraphy's ``CompareFunc.simple`` and ``steer_gate`` must agree exactly.
Needs TensorRT and the plugin library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner_runtime.backends.tensorrt import read_stamp
from aligner_runtime.contract import (ATTENTION_MASK, GATE_DECIDE, GATE_IN, GATE_OUT, INPUT_IDS, Key, PAST_PREFIX,
                                      POSITION_IDS, StampKey, position_ids)
from aligner_runtime.errors import AlignerError
from aligner_runtime.manifest import load_export

from aligner_export.tensorrt.build import import_tensorrt


@dataclass
class Comparison:
    within_tolerance: bool
    same_gate: bool
    gates: list
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.within_tolerance and self.same_gate


def prefill_feeds(input_names, batch: int, length: int, seed: int) -> dict:
    """Prefill inputs by name (§5 graph interface); past_key_values are None here, shaped from the engine later."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, : length // 4] = 0  # left padding on all rows but the first
    feeds = {}
    for name in input_names:
        if name == INPUT_IDS:
            feeds[name] = rng.integers(0, 100, size=(batch, length), dtype=np.int64)
        elif name == ATTENTION_MASK:
            feeds[name] = mask
        elif name == POSITION_IDS:
            feeds[name] = position_ids(mask)
        elif name == GATE_IN:
            feeds[name] = np.full(batch, GATE_DECIDE, dtype=np.float32)
        elif name.startswith(PAST_PREFIX):
            feeds[name] = None
        else:
            raise AlignerError(f"graph input {name} is not part of the steered decoder interface "
                               f"(docs/architecture.md §5)")
    return feeds


def compare_engine(model_dir: Path, engine_path: Path, plugins: Path | None = None, batch: int = 2,
                   prompt_length: int = 16, atol: float | None = None, rtol: float | None = None,
                   seed: int = 0) -> Comparison:
    trt = import_tensorrt()
    export = load_export(model_dir)
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise AlignerError(f"engine not found: {engine_path}")
    stamp = read_stamp(engine_path)
    if stamp.get(StampKey.MANIFEST_SHA256) != export.manifest_sha256:
        raise AlignerError(f"engine {engine_path} was built from another export (manifest_sha256 differs)")
    plugins = plugins or stamp.get("plugin_library")
    if not plugins:
        raise AlignerError("pass --plugins (the engine's stamp records no plugin library)")

    # deferred: polygraphy is of the [export] extra; aligner-export --help imports this module without them
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, LoadPlugins, TrtRunner
    from polygraphy.comparator import CompareFunc, Comparator

    LoadPlugins(plugins=[str(plugins)])()
    feeds = prefill_feeds(export.graph.inputs, batch, prompt_length, seed)
    engine = EngineFromBytes(engine_path.read_bytes())()
    for name in list(feeds):
        if feeds[name] is None:
            shape = list(engine.get_tensor_shape(name))
            shape[0], shape[2] = batch, 0
            feeds[name] = np.zeros(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
    atol = atol if atol is not None else (1e-3 if export.manifest.get(Key.DTYPE) == "fp32" else 5e-2)
    rtol = rtol if rtol is not None else atol
    runners = [OnnxrtRunner(SessionFromOnnx(str(export.model_path), providers=["CPUExecutionProvider"])),
               TrtRunner(engine)]
    results = Comparator.run(runners, data_loader=[feeds])
    within = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
    gates = [np.asarray(r[0][GATE_OUT]) for r in results.values()]
    return Comparison(within_tolerance=within, same_gate=all(np.array_equal(gates[0], g) for g in gates[1:]),
                      gates=gates[0].tolist(), atol=atol, rtol=rtol)
