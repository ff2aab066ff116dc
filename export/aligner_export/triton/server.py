"""Runs the ``tritonserver`` that PyPI's ``nvidia-pytriton`` carries, on a machine without a GPU or a Triton install.

    python -m aligner_export.triton.server --env ENV --repository REPO [--http-port 8000] [--grpc-port 8001]

``ENV`` is a Python environment (a venv) holding ``nvidia-pytriton`` and, for the model, ``numpy < 2`` and
``inferaligner-edge``; write the repository with ``aligner-export triton --execution-env ENV`` so that the model's
stub runs in it. Two things the wheel leaves to its own launcher are done here:

- the Python backend's stub for the environment's Python version is put beside ``libtriton_python.so`` in a backend
  directory of our own (the wheel keeps one stub per version under ``python_backend_stubs/``);
- the wheel's bundled libraries (``nvidia_pytriton.libs``) go on ``LD_LIBRARY_PATH`` for the server and the stub.

The stub links ``libpython3.X.so``; where the system has none, :meth:`PytritonServer.check` says so. JetPack's and
NGC's Triton builds need none of this (docs/serving.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from aligner_runtime.errors import AlignerError, run_cli


class PytritonServer:
    """``tritonserver`` from ``env``'s nvidia-pytriton, serving ``repository``; a context manager that starts it
    and waits until it is live."""

    def __init__(self, env: str | Path, repository: str | Path, workdir: str | Path, *, http_port: int = 8000,
                 grpc_port: int = 8001, address: str = "127.0.0.1", extra_args: tuple[str, ...] = ()):
        self.env = Path(env)
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.http_port, self.grpc_port, self.address = http_port, grpc_port, address
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "tritonserver.log"
        self.root, self.python_version = self._locate()

    def _locate(self) -> tuple[Path, str]:
        libs = sorted(self.env.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
        if not libs:
            raise AlignerError(f"no nvidia-pytriton in {self.env} (pip install nvidia-pytriton there)")
        root = libs[-1]
        return root, root.parents[2].name.removeprefix("python")

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    def environ(self) -> dict:
        libs = self.root.parents[1] / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        return env

    def backend_directory(self) -> Path:
        """``workdir/backends/python``: the wheel's Python backend and the stub for the environment's Python."""
        python = self.workdir / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in (self.root / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python / item.name)
        shutil.copy2(self.stub, python / self.stub.name)
        return python.parent

    def check(self) -> None:
        """Raises :class:`AlignerError` naming what keeps the server or its stub from starting here."""
        if not self.binary.is_file():
            raise AlignerError(f"no tritonserver binary in {self.root}")
        if not self.stub.is_file():
            raise AlignerError(f"nvidia-pytriton has no Python backend stub for Python {self.python_version}")
        if shutil.which("ldd"):
            for exe in (self.binary, self.stub):
                result = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, env=self.environ(),
                                        timeout=30)
                missing = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
                if missing:
                    raise AlignerError(f"{exe.name} cannot start here: {', '.join(missing)} not found")

    def command(self) -> list[str]:
        return [str(self.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self.backend_directory()}", f"--http-address={self.address}",
                f"--http-port={self.http_port}", f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", *self.extra_args]

    def __enter__(self) -> "PytritonServer":
        self.check()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environ())
        log.close()
        return self

    def wait_live(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AlignerError(f"tritonserver exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/live", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AlignerError(f"tritonserver was not live after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aligner_export.triton.server", description=__doc__.splitlines()[0])
    p.add_argument("--env", required=True, help="Python environment holding nvidia-pytriton")
    p.add_argument("--repository", required=True, help="model repository (aligner-export triton)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--address", default="127.0.0.1")
    args = p.parse_args(argv)

    def serve() -> int:
        with tempfile.TemporaryDirectory(prefix="tritonserver-") as workdir:
            server = PytritonServer(args.env, args.repository, workdir, http_port=args.http_port,
                                    grpc_port=args.grpc_port, address=args.address)
            server.check()
            return subprocess.call(server.command(), env=server.environ())

    return run_cli(serve)


if __name__ == "__main__":
    sys.exit(main())
