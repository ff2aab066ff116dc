"""``aligner-export build``: a TensorRT engine from an export directory, with the SteerGate/SteerShift plugins."""

from __future__ import annotations

from pathlib import Path

from aligner_runtime.contract import STAMP_FILE, Key
from aligner_runtime.contract.choices import ENGINE_PRECISIONS
from aligner_runtime.manifest import load_export

from aligner_export.tensorrt import build as trt_build


def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="OUTDIR", help="export directory (aligner-export export)")
    parser.add_argument("--plugins", required=True, metavar="LIB",
                        help="plugin library: libaligner_trt_plugins.so (or libaligner_trt_plugins_dynamic.so)")
    parser.add_argument("-o", "--output", required=True, metavar="ENGINE",
                        help="engine file; its stamp ENGINE.json (checked by the runtimes) is written beside it")
    parser.add_argument("--precision", choices=ENGINE_PRECISIONS, default=None,
                        help="default: the export's dtype (TensorRT 11 builds strongly typed, so it must match)")
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--max-prompt", type=int, default=512, help="longest prompt (prefill profile)")
    parser.add_argument("--opt-prompt", type=int, default=128)
    parser.add_argument("--max-context", type=int, default=1024, help="prompt plus generated tokens")
    parser.add_argument("--no-decode-profile", action="store_true",
                        help="one profile only (prefill, also used for decode)")
    parser.add_argument("--workspace-mib", type=int, default=0, help="builder workspace limit (0: TensorRT's default)")
    parser.add_argument("--no-aliasing", action="store_true",
                        help="do not let SteerShift run in place (PreviewFeature.ALIASED_PLUGIN_IO_10_03)")


def run(args) -> int:
    trt_build.import_tensorrt()  # one clear line before anything else when TensorRT is absent
    precision = args.precision
    if precision is None:
        precision = load_export(args.model).manifest.get(Key.DTYPE, "fp32")
    profiles = trt_build.Profiles(max_batch=args.max_batch, opt_batch=args.opt_batch, max_prompt=args.max_prompt,
                                  opt_prompt=args.opt_prompt, max_context=args.max_context,
                                  decode_profile=not args.no_decode_profile)
    stamp = trt_build.build_engine(Path(args.model), Path(args.plugins), Path(args.output), precision=precision,
                                   profiles=profiles, workspace_mib=args.workspace_mib,
                                   aliasing=not args.no_aliasing)
    print(f"engine: {args.output} (TensorRT {stamp['trt_version']}, compute capability "
          f"{stamp['compute_capability']}, {precision}); stamp: {Path(args.output).parent / STAMP_FILE}")
    return 0
