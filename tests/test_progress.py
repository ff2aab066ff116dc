"""Progress on the long steps: ``aligner-export export`` shows a bar over its stages (and one over the quantized
graph's comparison with the float graph) on stderr when stderr is a terminal, and none in a log or a pipe; stdout
keeps the result lines either way."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from runtime_exports import PROMPTS

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "export"), str(REPO / "runtime")]))


def _run_with_tty_stderr(args, cwd) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty has 0 columns, which tqdm takes as a bar of no width.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "aligner_export", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, cwd=cwd, env=_env())
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=600), out, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def pack(tmp_path_factory, tiny_model_dir):
    model = tiny_model_dir("llama")
    path = tmp_path_factory.mktemp("progress") / "pack.safetensors"
    proc = subprocess.run([sys.executable, "-m", "aligner_export", "calibrate", "--target", model, "-o", path,
                           "--harmful", PROMPTS / "harmful.txt", "--harmless", PROMPTS / "harmless.txt"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "activations" not in proc.stderr and "batch/s" not in proc.stderr  # no bar in a pipe
    return model, path


def test_export_shows_its_stages_on_a_terminal(pack, tmp_path):
    model, path = pack
    code, out, err = _run_with_tty_stderr(["export", "--target", model, "--pack", path, "-o", tmp_path / "out",
                                           "--weights", "int8"], tmp_path)
    assert code == 0, err
    for stage in ("base export", "residual stream", "steering nodes", "save and check", "validation",
                  "quantisation", "integrity digests"):
        assert stage in err
    assert "int8 vs float" in err and "batch" in err
    assert "export:" in err and "step" in err
    assert "validated:" in out and "wrote" in out and "export:" not in out  # results on stdout, bars on stderr


def test_no_bar_in_a_pipe(pack, tmp_path):
    model, path = pack
    proc = subprocess.run([sys.executable, "-m", "aligner_export", "export", "--target", model, "--pack", path,
                           "-o", tmp_path / "out", "--no-validate"], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "step" not in proc.stderr and "\r" not in proc.stderr
    assert "wrote" in proc.stdout
