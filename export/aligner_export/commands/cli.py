"""``aligner-export``: calibrate, export, build, compare, eval, inspect, models, triton (docs/architecture.md §7).

Each subcommand lives in ``aligner_export/commands/<name>.py`` with two functions: ``configure(parser)``, which only adds
arguments and imports nothing heavy, and ``run(args) -> int``, which does the work. ``--help`` therefore answers
without importing torch.

A device installs the package without the ``export`` extra (docs/architecture.md §2). The dispatcher checks, before a
command does any work, that the packages the command needs are importable, and turns a missing one into one line naming
the extra to install, exit status 2; an import of a package of an extra that fails later, inside the command, gets the
same line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from aligner_runtime.errors import AlignerError, argument_parser, run_cli

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


# Import names of the ``export`` extra's packages that the commands use (pyproject.toml ``[export]``).
EXPORT_MODULES = ("torch", "transformers", "optimum", "onnx", "onnx_ir", "polygraphy", "safetensors", "peft",
                  "accelerate", "matplotlib", "tqdm", "sklearn", "gguf", "onnxscript")
# What each command needs beyond the runtime, checked before it starts: a command must not fail for a missing package
# after minutes of work (eval draws its plot last, export validates with onnxruntime at the end). ``inspect`` and
# ``triton`` work in a runtime-only install; ``build`` and ``compare`` say themselves when TensorRT is missing.
NEEDS = {
    "calibrate": ("torch", "transformers", "safetensors", "tqdm", "matplotlib"),
    "export": ("torch", "transformers", "optimum", "onnx", "onnx_ir", "safetensors", "tqdm", "onnxruntime"),
    "build": ("onnx", "polygraphy"),
    "compare": ("onnx", "polygraphy", "onnxruntime"),
    "eval": ("tqdm", "matplotlib", "onnxruntime"),
    "inspect": (),
    "models": ("torch", "transformers", "safetensors", "peft"),
    "triton": ("onnxruntime",),
    # signing runs on the runtime's own dependencies (cryptography is a core one): no extra to name
    "keygen": (),
    "sign": (),
}


def _install_hint(module: str) -> str | None:
    """The ``pip install`` line that provides ``module``, or None for a module of no extra (a bug, not an install)."""
    top = module.partition(".")[0]
    if top in EXPORT_MODULES:
        return 'pip install "inferaligner-edge[export]"'
    if top == "onnxruntime":
        return 'pip install "inferaligner-edge[cpu]" (or "[gpu]" for the CUDA build)'
    if top in ("tensorrt", "cuda"):
        return 'pip install "inferaligner-edge[tensorrt]" (JetPack ships TensorRT with the OS)'
    return None


def _missing(modules) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a stub without a spec stands in its place
            found = False
        if not found:
            missing.append(name)
    return missing


def _missing_line(command: str, missing: list[str]) -> str:
    names = ", ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return f"aligner-export {command} needs {names}, which {verb} not installed here: {_install_hint(missing[0])}"


def run_command(command: str, module, args) -> int:
    missing = _missing(NEEDS.get(command, ()))
    if missing:
        raise AlignerError(_missing_line(command, missing))
    try:
        return module.run(args)
    except ModuleNotFoundError as exc:
        if exc.name is None or _install_hint(exc.name) is None:
            raise
        raise AlignerError(_missing_line(command, [exc.name.partition(".")[0]])) from None


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
        p.set_defaults(_module=module, _command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: run_command(args._command, args._module, args))


if __name__ == "__main__":
    sys.exit(main())
