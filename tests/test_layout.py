"""The layout rules of docs/layout.md over ``export/aligner_export`` and ``runtime/aligner_runtime`` (issue 19):

- no import circle, at module or function level;
- no Python file over 600 lines;
- an import inside a function only for a module that is heavy or optional (:data:`DEFERRABLE`, or a package module
  that imports one at load), with a ``# deferred: <reason>`` comment directly above it or above its block of
  consecutive imports;
- the runtime never imports torch, and the torch-free modules of the exporter (``graph/``, pack, gate, corpus, ort)
  do not load it.

Each rule is checked on a synthetic tree too, so that the checks are seen to fail on a violation.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import contract_counts as counts

MAX_LINES = 600

# Import names of packages that may be imported inside a function: those of an extra (absent from a device's
# runtime-only install, pyproject.toml), the in-process modules of a server that hosts us (Triton), and the few core
# dependencies that only one path needs and that cost more than a light import (Pillow for images, cryptography for
# signed exports).
DEFERRABLE = frozenset({
    # [export]: torch, transformers and onnx-ir take seconds to import
    "torch", "transformers", "optimum", "peft", "accelerate", "safetensors", "gguf", "sklearn", "matplotlib",
    "tqdm", "onnx", "onnx_ir", "onnxscript", "polygraphy",
    # [cpu] / [gpu] (and the onnxruntime-genai builder's own venv)
    "onnxruntime", "onnxruntime_genai",
    # [tensorrt]
    "tensorrt", "cuda",
    # [serve]
    "starlette", "uvicorn", "prometheus_client",
    # Triton Inference Server's Python backend and client
    "triton_python_backend_utils", "tritonclient",
    # core, for one path only
    "PIL", "cryptography",
})

# Modules whose owners (parallel work on issue 19) apply the deferral rule in their own branches; the deferral check
# skips them until they land. Remove an entry when its module passes; the other checks cover them already.
PENDING = frozenset()  # modules still to follow the deferral rule (none left)

TORCH_FREE = ("aligner_export.graph", "aligner_export.pack", "aligner_export.gate", "aligner_export.corpus",
              "aligner_export.ort")


def heavy_modules(root: Path, tops) -> set[str]:
    """Package modules that import a :data:`DEFERRABLE` package at load, themselves or through the modules they
    import at load."""
    external: dict[str, set[str]] = {}
    graph = counts.import_graph(root, tops, function_level=False, external=external)
    heavy = {m for m, names in external.items() if names & DEFERRABLE}
    changed = True
    while changed:
        changed = False
        for module, edges in graph.items():
            if module not in heavy and edges & heavy:
                heavy.add(module)
                changed = True
    return heavy


def deferral_violations(root: Path = counts.ROOT, tops=counts.TOPS, pending=PENDING) -> list[str]:
    """One line per function-level import that defers a light module or lacks its ``# deferred:`` comment."""
    modules = counts.package_modules(root, tops)
    heavy = heavy_modules(root, tops)
    out = []
    for name, path in modules.items():
        if name in pending:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        rel = path.relative_to(root).as_posix()
        for record in counts.imports(path, package):
            if not record.in_function:
                continue
            target = record.targets[0]
            internal = {counts.resolve(t, modules) for t in record.imported}
            allowed = internal <= heavy if "" not in internal else target.partition(".")[0] in DEFERRABLE
            if not allowed:
                light = ", ".join(sorted(internal - heavy)) if "" not in internal else target
                out.append(f"{rel}:{record.line}: {light} is neither heavy nor optional: import it at module level")
            elif record.comment is None or not record.comment[len("# deferred:"):].strip():
                out.append(f"{rel}:{record.line}: deferred import of {target} without a '# deferred: <reason>' "
                           f"comment above it")
    return out


def long_files(root: Path = counts.ROOT, tops=counts.TOPS) -> list[str]:
    return [f"{p.relative_to(root).as_posix()}: {n} lines"
            for p in counts.package_modules(root, tops).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]


def torch_importers(root: Path = counts.ROOT, tops=counts.TOPS) -> list[str]:
    """Runtime modules that import torch anywhere, and torch-free exporter modules that load it."""
    modules = counts.package_modules(root, tops)
    out = []
    for name, path in modules.items():
        if name.startswith("aligner_runtime") and any(
                r.targets[0].partition(".")[0] == "torch" for r in counts.imports(path, "")):
            out.append(f"{name} imports torch")
    external: dict[str, set[str]] = {}
    graph = counts.import_graph(root, tops, function_level=False, external=external)
    for name in modules:
        if not name.startswith(TORCH_FREE):
            continue
        seen, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        if any("torch" in external[m] for m in seen):
            out.append(f"{name} loads torch")
    return out


# --- the tree itself -------------------------------------------------------------------------------------------------

def test_no_import_circles():
    assert counts.cycles(counts.import_graph()) == []


def test_no_file_over_600_lines():
    assert long_files() == []


def test_function_level_imports_are_deferred_heavy_dependencies():
    assert deferral_violations() == []


def test_pending_modules_still_exist_and_still_violate():
    """An entry of :data:`PENDING` whose module is gone or already follows the rule is stale: remove it."""
    modules = counts.package_modules()
    assert PENDING <= set(modules)
    violating = {line.split(":")[0] for line in deferral_violations(pending=frozenset())}
    stale = {m for m in PENDING if modules[m].relative_to(counts.ROOT).as_posix() not in violating}
    assert stale == set()


def test_torch_stays_out_of_the_runtime_and_the_torch_free_modules():
    assert torch_importers() == []


# --- the checks on a synthetic tree ----------------------------------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> tuple[Path, tuple[str, ...]]:
    for rel, text in files.items():
        path = tmp_path / "export" / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path, ("export/pkg",)


def test_checks_fail_on_a_synthetic_violation(tmp_path):
    root, tops = _tree(tmp_path, {
        "__init__.py": "",
        "low.py": '''
            def f():
                from pkg import high  # closes a circle through a function-level import
                return high
            ''',
        "high.py": '''
            import json

            import onnx

            from pkg import low


            def light():
                import re  # a light module, deferred
                return re


            def uncommented():
                import torch
                return torch


            def commented():
                # deferred: torch, only when a model is loaded
                import torch

                from pkg import heavy
                return torch, heavy


            def blank_comment():
                # deferred:
                import transformers
                return transformers


            def internal_light():
                # deferred: no reason that holds: low is light
                from pkg import low as again
                return again
            ''',
        "heavy.py": "import torch\n",
        "long.py": "x = 1\n" * (MAX_LINES + 1),
        "ok.py": "x = 1\n" * MAX_LINES,
    })
    assert counts.cycles(counts.import_graph(root, tops)) == [["pkg.high", "pkg.low"]]
    assert counts.cycles(counts.import_graph(root, tops, function_level=False)) == []
    assert long_files(root, tops) == [f"export/pkg/long.py: {MAX_LINES + 1} lines"]
    found = deferral_violations(root, tops, pending=frozenset())
    assert [line.split(": ", 1)[0] for line in found] == [
        "export/pkg/high.py:10", "export/pkg/high.py:15", "export/pkg/high.py:29", "export/pkg/high.py:35",
        "export/pkg/low.py:3"]
    assert "re is neither heavy nor optional" in found[0]
    assert "without a '# deferred: <reason>' comment" in found[1] and "torch" in found[1]
    assert "transformers without" in found[2]
    assert "pkg.low is neither heavy nor optional" in found[3]
    # pkg.high imports onnx at load, so deferring it is allowed; pkg.heavy imports torch at load
    assert heavy_modules(root, tops) >= {"pkg.high", "pkg.heavy"}


@pytest.mark.parametrize("text, torch_free", [
    ("import numpy\n", True),
    ("from pkg import heavy\n", False),
    ("def f():\n    import torch\n", True),  # at call time only: the module itself stays torch-free
])
def test_torch_free_check(tmp_path, text, torch_free):
    (tmp_path / "runtime" / "aligner_runtime").mkdir(parents=True)
    (tmp_path / "runtime" / "aligner_runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "aligner_runtime" / "uses_torch.py").write_text("def f():\n    import torch\n")
    pkg = tmp_path / "export" / "aligner_export"
    (pkg / "graph").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("import torch\n")
    (pkg / "graph" / "__init__.py").write_text(text.replace("pkg", "aligner_export"))
    found = torch_importers(tmp_path, counts.TOPS)
    assert "aligner_runtime.uses_torch imports torch" in found
    assert ("aligner_export.graph loads torch" not in found) == torch_free
