"""``aligner-export``: calibrate, export, build, compare, eval, inspect, models (ARCHITECTURE.md §7).

Each subcommand lives in ``aligner_export/commands/<name>.py`` with two functions: ``configure(parser)``, which only adds
arguments and imports nothing heavy, and ``run(args) -> int``, which does the work. ``--help`` therefore answers
without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aligner_runtime.errors import argument_parser, run_cli

from aligner_export import __version__

COMMANDS = {
    "calibrate": "compute steering vectors and the gate from prompt sets; write a steering pack",
    "export": "export an HF model to ONNX with the steering nodes baked in",
    "build": "build a TensorRT engine from an export directory (needs TensorRT and the plugin library)",
    "compare": "compare ONNX Runtime and TensorRT outputs for an export directory and its engine",
    "eval": "evaluate an export steered and unsteered: ASR, gate TPR/FPR, over-refusal, latency",
    "inspect": "verify and describe a steering pack, an export directory, a .onnx file or an engine",
    "keygen": "make an Ed25519 key pair for signing exports",
    "sign": "sign an export directory with an Ed25519 key (after checking it as the device does)",
    "models": "get the embedded SmolLM2 model and build its aligned sibling in the cache",
    "triton": "write a Triton Inference Server model repository that serves an export (steering always on)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(prog="aligner-export", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"aligner_export.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"aligner_export.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args._module.run(args))


if __name__ == "__main__":
    sys.exit(main())
