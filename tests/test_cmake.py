"""The CMake configuration says what it skipped and why (docs/architecture.md §2: each part switches itself off with a
message). Configures only (no build): a few seconds, most of it CUDA compiler detection."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _configure(build: Path, *args: str) -> str:
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_configure_without_tensorrt_says_what_it_skipped(tmp_path):
    empty = tmp_path / "no-tensorrt"
    empty.mkdir()
    out = _configure(tmp_path / "build", f"-DTensorRT_INCLUDE_DIR={empty}")
    skipped = [line for line in out.splitlines() if "inferaligner: skipping" in line]
    assert skipped, out
    text = "\n".join(skipped)
    assert "TensorRT plugins and the C API" in text
    # Either nvcc is absent, or it is present and the TensorRT headers are what is missing.
    assert ("no CUDA compiler" in text) or ("no TensorRT headers" in text), text
    if "no CUDA compiler" not in text:
        assert "inferaligner: building CUDA kernels for" in out
    # Nothing a user cannot act on: the kernels need only the CUDA runtime, not cuBLAS, and say nothing about it.
    assert "cublas" not in out.lower()


@pytest.mark.parametrize("include_dir", [d for d in os.environ.get("ALIGNER_TRT_HEADER_DIRS", "").split(":") if d]
                         or [pytest.param("", marks=pytest.mark.skip(
                             reason="set ALIGNER_TRT_HEADER_DIRS=dir[:dir] to TensorRT include directories"))])
def test_configure_with_headers_only_is_compile_only(tmp_path, include_dir):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the TensorRT parts need CUDA")
    out = _configure(tmp_path / "build", f"-DTensorRT_INCLUDE_DIR={include_dir}")
    assert f"headers in {include_dir}" in out
    if "skipping linking libaligner_trt_plugins" in out:  # no libnvinfer beside these headers
        assert "compile-only" in out


def test_configure_finds_nlohmann_json_in_the_python_environment(tmp_path):
    """The C runtime's JSON library is installed, never vendored: the PyPI wheel nlohmann-json in the environment of
    ALIGNER_PYTHON is found without importing it."""
    if importlib.util.find_spec("nlohmann_json") is None:
        pytest.skip(f"nlohmann-json is not installed in {sys.executable}'s environment (pip install nlohmann-json)")
    out = _configure(tmp_path / "build", f"-DALIGNER_PYTHON={sys.executable}",
                     "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON")
    assert "inferaligner: nlohmann/json 3." in out, out
    assert "skipping the C runtime" not in out


def test_configure_without_nlohmann_json_switches_the_c_runtime_off(tmp_path):
    if any(Path(d, "nlohmann", "json.hpp").is_file() for d in ("/usr/include", "/usr/local/include")):
        pytest.skip("a system-wide nlohmann/json is installed, so the C runtime cannot be configured without it here")
    no_json_python = tmp_path / "python"
    no_json_python.write_text("#!/bin/sh\nexit 0\n")  # an interpreter whose environment has no nlohmann_json
    no_json_python.chmod(0o755)
    out = _configure(tmp_path / "build", f"-DALIGNER_PYTHON={no_json_python}",
                     "-DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON")
    skipped = [line for line in out.splitlines() if "inferaligner: skipping the C runtime" in line]
    assert len(skipped) == 1, out
    assert "nlohmann/json not found" in skipped[0] and "pip install nlohmann-json" in skipped[0]


def test_configure_without_openssl_switches_the_c_runtime_off(tmp_path):
    """The C API verifies signed exports with OpenSSL's libcrypto (issue 21); without it the C runtime is not built at
    all (a C API that could not verify would load unsigned exports where a key is configured), and the configure step
    says what to install."""
    out = _configure(tmp_path / "build", f"-DALIGNER_PYTHON={sys.executable}",
                     "-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON")
    skipped = [line for line in out.splitlines() if "inferaligner: skipping the C runtime" in line]
    assert len(skipped) == 1, out
    if "nlohmann/json not found" not in skipped[0]:
        assert "OpenSSL libcrypto" in skipped[0] and "apt-get install libssl-dev" in skipped[0], skipped[0]
