"""``aligner-export compare``: ONNX Runtime vs TensorRT outputs for an export directory and its engine (Polygraphy).

Feeds one prefill step (a random prompt, steer_gate_in = -1, empty past) to both and compares every output with
Polygraphy's comparator; steer_gate must agree exactly. Needs TensorRT and the plugin library.
"""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="OUTDIR", help="export directory")
    parser.add_argument("--engine", required=True, metavar="ENGINE", help="engine from aligner-export build")
    parser.add_argument("--plugins", default=None, metavar="LIB",
                        help="plugin library (default: the one recorded in ENGINE.json)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--atol", type=float, default=None, help="default: 1e-3 for fp32 exports, 5e-2 otherwise")
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)


def _feeds(export, batch: int, length: int, seed: int):
    from aligner_runtime.errors import AlignerError

    """Prefill inputs by name (§5 graph interface); past_key_values are None here, shaped from the engine later."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for name in export.graph.inputs:
        if name == "input_ids":
            feeds[name] = rng.integers(0, 100, size=(batch, length), dtype=np.int64)
        elif name == "attention_mask":
            mask = np.ones((batch, length), dtype=np.int64)
            mask[1:, : length // 4] = 0  # left padding on all rows but the first
            feeds[name] = mask
        elif name == "position_ids":
            mask = feeds.get("attention_mask", np.ones((batch, length), dtype=np.int64))
            feeds[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        elif name == "steer_gate_in":
            feeds[name] = np.full(batch, -1.0, dtype=np.float32)
        elif name.startswith("past_key_values."):
            feeds[name] = None
        else:
            raise AlignerError(f"graph input {name} is not part of the steered decoder interface (ARCHITECTURE.md §5)")
    return feeds


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from aligner_runtime.errors import AlignerError
    from aligner_runtime.manifest import load_export

    from . import trt_build

    trt = trt_build.import_tensorrt()
    export = load_export(args.model)
    engine_path = Path(args.engine)
    if not engine_path.is_file():
        raise AlignerError(f"engine not found: {engine_path}")
    stamp_path = engine_path.parent / trt_build.STAMP
    if not stamp_path.is_file():
        raise AlignerError(f"engine {engine_path} has no {trt_build.STAMP} beside it (build it with aligner-export build)")
    stamp = json.loads(stamp_path.read_text())
    if stamp.get("manifest_sha256") != export.manifest_sha256:
        raise AlignerError(f"engine {engine_path} was built from another export (manifest_sha256 differs)")
    plugins = args.plugins or stamp.get("plugin_library")
    if not plugins:
        raise AlignerError("pass --plugins (ENGINE.json records no plugin library)")

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import CompareFunc, Comparator

    logger = trt.Logger(trt.Logger.WARNING)
    trt_build.load_plugins(trt, trt.Builder(logger), Path(plugins))
    feeds = _feeds(export, args.batch, args.prompt_length, args.seed)
    engine_loader = EngineFromBytes(engine_path.read_bytes())
    engine = engine_loader()
    for name in list(feeds):
        if feeds[name] is None:
            shape = list(engine.get_tensor_shape(name))
            shape[0], shape[2] = args.batch, 0
            feeds[name] = np.zeros(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
    atol = args.atol if args.atol is not None else (1e-3 if export.manifest.get("dtype") == "fp32" else 5e-2)
    rtol = args.rtol if args.rtol is not None else atol
    runners = [OnnxrtRunner(SessionFromOnnx(str(export.model_path), providers=["CPUExecutionProvider"])),
               TrtRunner(engine)]
    results = Comparator.run(runners, data_loader=[feeds])
    compare = CompareFunc.simple(atol=atol, rtol=rtol)
    ok = bool(Comparator.compare_accuracy(results, compare_func=compare))
    gates = [np.asarray(r[0]["steer_gate"]) for r in results.values()]
    same_gate = all(np.array_equal(gates[0], g) for g in gates[1:])
    print(f"compare: outputs within atol={atol} rtol={rtol}: {'yes' if ok else 'NO'}; "
          f"steer_gate identical: {'yes' if same_gate else 'NO'} ({gates[0].tolist()})")
    return 0 if ok and same_gate else 1
