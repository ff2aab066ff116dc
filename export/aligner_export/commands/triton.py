"""``aligner-export triton``: a Triton Inference Server model repository that serves an export, steering on."""

from __future__ import annotations

from pathlib import Path

from aligner_runtime.contract.choices import PREFILL_MODES, PROVIDERS, TRITON_INSTANCE_KINDS

from aligner_export.triton.repository import RepositoryOptions, write_repository


def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="OUTDIR", help="export directory (aligner-export export)")
    parser.add_argument("-o", "--output", required=True, metavar="REPO",
                        help="model repository: created, or an existing one that gains the model")
    parser.add_argument("--name", default="inferaligner", help="model name in the repository (default inferaligner)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (each loads the export once)")
    parser.add_argument("--instance-kind", choices=TRITON_INSTANCE_KINDS, default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="requests per execute and rows of each instance's continuous batch (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests an instance holds waiting for a row; past it a request is refused")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens when a request gives no max_tokens")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request ends")
    parser.add_argument("--queue-delay-us", type=int, default=1000, help="dynamic batching's max queue delay")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default="alone",
                        help="prefill joining requests alone (default) or together")
    parser.add_argument("--reference-export", action="store_true",
                        help="reference the export by absolute path instead of copying it into the repository")
    parser.add_argument("--provider", action="append", choices=PROVIDERS, default=None,
                        help="ONNX Runtime execution provider, in order of preference (repeatable; default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT's default)")
    parser.add_argument("--engine", metavar="ENGINE",
                        help="TensorRT engine (aligner-export build) to run where tensorrt is installed; "
                             "ONNX Runtime runs the export elsewhere")
    parser.add_argument("--plugins", metavar="LIB", help="steering plugin library for --engine")
    parser.add_argument("--execution-env", metavar="DIR",
                        help="Python environment for the model (Triton's EXECUTION_ENV_PATH): a directory or a "
                             "conda-pack archive holding aligner_runtime (numpy < 2 for nvidia-pytriton's server)")


def run(args) -> int:
    options = RepositoryOptions(
        name=args.name, instances=args.instances, instance_kind=args.instance_kind,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_tokens=args.max_tokens,
        request_timeout=args.request_timeout, queue_delay_us=args.queue_delay_us, prefill=args.prefill,
        copy_export=not args.reference_export, providers=tuple(args.provider or ()), threads=args.threads,
        engine=Path(args.engine) if args.engine else None, plugins=Path(args.plugins) if args.plugins else None,
        execution_env=Path(args.execution_env) if args.execution_env else None)
    model_dir = write_repository(args.model, args.output, options)
    print(f"triton model: {model_dir} (decoupled, max batch {options.max_batch_size}, {options.instances} "
          f"instance(s)); serve with: tritonserver --model-repository {Path(args.output).resolve()}")
    return 0
