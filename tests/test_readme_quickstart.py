"""The README's Quick start runs as written: its shell block and its Python snippet, taken from README.md itself, on
tiny random models.

What differs from a user's run, and only this:
- ``aligner-export models`` (which downloads SmolLM2) is left out, and the two model paths ``T=`` and ``A=`` point at a
  tiny random target and a tiny random sibling of another seed;
- the shipped corpus that ``calibrate`` reads by default is replaced by a trimmed copy (the first records of every
  source, in the same layout), because the whole corpus takes minutes even on a tiny model;
- the commands run in a scratch directory that holds a link ``export`` to the repository's ``export/``, so that the
  relative paths of shipped files resolve as they do from the repository's root, and ``aligner-export`` and
  ``aligner-run`` on ``PATH`` are this checkout's.
The Python snippet runs with the export side (torch, transformers, onnx, ...) hidden, as the README says it needs no
torch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_cli_install import BOOT_CODE, HIDDEN

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "export" / "aligner_export" / "data" / "corpus"
PER_SOURCE = 10  # records kept per (source, role) of each corpus file


def quick_start() -> tuple[str, str]:
    """The Quick start's first shell block and its first Python block, as README.md has them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.S | re.M)
    shell = next(body for lang, body in blocks if lang == "")
    python = next(body for lang, body in blocks if lang == "python")
    return shell, python


def _trimmed_corpus(dest: Path) -> Path:
    dest.mkdir()
    for path in sorted(CORPUS.glob("*.jsonl")):
        kept, counts = [], {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = (row["source"], row["role"])
            counts[key] = counts.get(key, 0) + 1
            if counts[key] <= PER_SOURCE:
                kept.append(line)
        (dest / path.name).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return dest


def _shims(bin_dir: Path, corpus: Path) -> None:
    bin_dir.mkdir()
    paths = [str(REPO / "export"), str(REPO / "runtime")]
    trim = f"import aligner_export.corpus\naligner_export.corpus.CORPUS_DIR = Path({str(corpus)!r})\n"
    for name, setup, entry in (("aligner-export", trim, "from aligner_export.commands.cli import main"),
                               ("aligner-run", "", "from aligner_runtime.cli import main")):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom pathlib import Path\nsys.path[:0] = {paths!r}\n"
                          f"{setup}{entry}\nsys.exit(main())\n")
        script.chmod(0o755)


def test_quick_start_runs_as_written(tmp_path, tiny_model_dir):
    shell, python = quick_start()
    target, aligned = tiny_model_dir("llama"), tiny_model_dir("llama", seed=1)
    lines = shell.splitlines()
    assert lines[0].split("#")[0].split() == ["aligner-export", "models"]
    assert sum(line.startswith(("T=", "A=")) for line in lines) == 2
    lines = [f"T={target}" if line.startswith("T=") else f"A={aligned}" if line.startswith("A=") else line
             for line in lines[1:]]

    work = tmp_path / "work"
    work.mkdir()
    (work / "export").symlink_to(REPO / "export", target_is_directory=True)
    _shims(tmp_path / "bin", _trimmed_corpus(tmp_path / "corpus"))
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (work / "smollm2.pack.safetensors").is_file()
    assert (work / "cal").is_dir() and any((work / "cal").iterdir())
    assert (work / "smollm2-steered" / "inferaligner.json").is_file()
    report = json.loads((work / "rep" / "report.json").read_text())
    assert report  # the eval line wrote its report
    assert re.search(r"\[gate=[01] score=", proc.stderr)  # aligner-run's gate line

    env = dict(os.environ, PYTHONPATH=str(REPO / "runtime"))
    proc = subprocess.run([sys.executable, "-c", BOOT_CODE, ",".join(HIDDEN), python], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
