"""The CLIs in a device install (``[cpu]``: no torch, transformers, optimum, onnx, ...): every ``aligner-export``
command says in one line which extra is missing and exits 2, with no traceback; ``inspect`` and ``triton`` work or say
so in one line; ``aligner-run --backend tensorrt`` without TensorRT says that TensorRT is missing.

The device install is simulated in a subprocess whose import system refuses the packages that only the ``export`` and
``tensorrt`` extras bring (a meta path finder raising ``ModuleNotFoundError``, as a missing package does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime_exports import tiny_export

REPO = Path(__file__).resolve().parents[1]
# Import names of what a `pip install ".[cpu]"` does not bring (pyproject.toml: the export and tensorrt extras).
HIDDEN = ("torch", "transformers", "optimum", "onnx", "onnx_ir", "onnxscript", "polygraphy", "safetensors", "peft",
          "accelerate", "matplotlib", "sklearn", "gguf", "tensorrt", "cuda")
EXTRA_LINE = 'pip install "inferaligner-edge[export]"'

BOOT = textwrap.dedent("""
    import runpy, sys
    HIDDEN = set(sys.argv[1].split(","))
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Hide())
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


# The same bootstrap running a piece of code instead of a module.
BOOT_CODE = BOOT.replace('runpy.run_module(module, run_name="__main__", alter_sys=True)', "exec(module)")


def run_device(module: str, *args, hidden=HIDDEN, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "export"), str(REPO / "runtime")]))
    return subprocess.run([sys.executable, "-c", BOOT, ",".join(hidden), module, *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""


def test_the_hook_hides_the_export_side():
    """The simulation itself: every hidden package fails to import, and what a device install has still imports."""
    code = ("import importlib\n"
            f"for n in {HIDDEN!r} + ('numpy', 'onnxruntime', 'tokenizers', 'jinja2', 'PIL'):\n"
            "    try:\n        importlib.import_module(n); print('present', n)\n"
            "    except ModuleNotFoundError:\n        print('hidden', n)\n")
    proc = subprocess.run([sys.executable, "-c", BOOT_CODE, ",".join(HIDDEN), code], capture_output=True, text=True,
                          timeout=300)
    words = proc.stdout.split()
    assert words == [w for n in HIDDEN for w in ("hidden", n)] + \
        [w for n in ("numpy", "onnxruntime", "tokenizers", "jinja2", "PIL") for w in ("present", n)], proc.stderr


# Arguments that parse; the paths need not exist: the check of the extra comes before any other work.
COMMAND_ARGS = {
    "calibrate": ["--target", "m", "-o", "p.safetensors"],
    "export": ["--target", "m", "--pack", "p.safetensors", "-o", "out"],
    "build": ["--model", "out", "--plugins", "lib.so", "-o", "e.engine"],
    "compare": ["--model", "out", "--engine", "e.engine"],
    "eval": ["--model", "out", "--report", "rep"],
    "models": [],
}


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_export_command_without_its_extra_is_one_line(command, tmp_path):
    proc = run_device("aligner_export", command, *COMMAND_ARGS[command], cwd=tmp_path)
    assert_one_line(proc, f"aligner-export {command} needs", "not installed", EXTRA_LINE)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_command_is_covered():
    from aligner_export.commands.cli import COMMANDS, NEEDS

    assert set(COMMANDS) == set(NEEDS) == set(COMMAND_ARGS) | {"inspect", "triton", "keygen", "sign"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir):
    return tiny_export(tmp_path_factory, tiny_model_dir)


def _works_or_one_line(proc):
    if proc.returncode == 0:
        assert "Traceback" not in proc.stderr
    else:
        assert_one_line(proc, "not installed", "inferaligner-edge[")


def test_inspect_in_a_device_install(export_dir, tmp_path):
    out, _, pack = export_dir
    for path in (pack, out, out / "model.onnx"):
        proc = run_device("aligner_export", "inspect", path, cwd=tmp_path)
        _works_or_one_line(proc)
        if proc.returncode == 0:
            assert proc.stdout.strip()


def test_triton_in_a_device_install(export_dir, tmp_path):
    out, _, _ = export_dir
    proc = run_device("aligner_export", "triton", "--model", out, "-o", tmp_path / "repo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "repo" / "inferaligner" / "config.pbtxt").is_file()


def test_run_works_in_a_device_install(export_dir, tmp_path):
    out, _, _ = export_dir
    proc = run_device("aligner_runtime.cli", "--model", out, "--prompt", "Hi", "--max-new-tokens", "2", "--json",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("model", ["engine_dir", "model.engine", "export"])
def test_tensorrt_backend_without_tensorrt(model, export_dir, tmp_path):
    out, _, _ = export_dir
    path = out if model == "export" else tmp_path / model
    proc = run_device("aligner_runtime.cli", "--model", path, "--backend", "tensorrt", "--prompt", "Hi", cwd=tmp_path)
    assert_one_line(proc, "TensorRT is not installed", "aligner-export build", "--backend onnxruntime")


def test_a_missing_extra_package_inside_a_command_is_one_line(monkeypatch, capsys):
    """A package of an extra imported late, inside the work, gets the same line; a missing module that belongs to
    no extra is a bug and keeps its traceback."""
    from aligner_export.commands import cli

    def late(args):
        raise ModuleNotFoundError("No module named 'onnx_ir'", name="onnx_ir")

    monkeypatch.setattr(cli, "NEEDS", dict(cli.NEEDS, inspect=()))
    module = type("M", (), {"run": staticmethod(late)})
    with pytest.raises(cli.AlignerError, match=r'inspect needs onnx_ir, which is not installed here: pip install '
                                                r'"inferaligner-edge\[export\]"'):
        cli.run_command("inspect", module, None)

    def bug(args):
        raise ModuleNotFoundError("No module named 'aligner_export.nothing'", name="aligner_export.nothing")

    module = type("M", (), {"run": staticmethod(bug)})
    with pytest.raises(ModuleNotFoundError):
        cli.run_command("inspect", module, None)
