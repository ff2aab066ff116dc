"""``aligner-export compare``: ONNX Runtime vs TensorRT outputs for an export directory and its engine
(``aligner_export.tensorrt.compare``). Needs TensorRT and the plugin library."""

from __future__ import annotations

from pathlib import Path

from aligner_export.tensorrt.compare import compare_engine


def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="OUTDIR", help="export directory")
    parser.add_argument("--engine", required=True, metavar="ENGINE", help="engine from aligner-export build")
    parser.add_argument("--plugins", default=None, metavar="LIB",
                        help="plugin library (default: the one recorded in the engine's stamp)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--atol", type=float, default=None, help="default: 1e-3 for fp32 exports, 5e-2 otherwise")
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    result = compare_engine(Path(args.model), Path(args.engine), Path(args.plugins) if args.plugins else None,
                            batch=args.batch, prompt_length=args.prompt_length, atol=args.atol, rtol=args.rtol,
                            seed=args.seed)
    print(f"compare: outputs within atol={result.atol} rtol={result.rtol}: "
          f"{'yes' if result.within_tolerance else 'NO'}; steer_gate identical: "
          f"{'yes' if result.same_gate else 'NO'} ({result.gates})")
    return 0 if result.ok else 1
