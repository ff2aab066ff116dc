"""No dead references in what a user reads: the README, docs/, the plugin and model READMEs, pyproject.toml and the
``--help`` of aligner-export (every subcommand), aligner-run and aligner-serve.

Two kinds of reference are checked: markdown links (``[text](target)``, resolved against the file's directory) and
path-like mentions (a token whose first component is a top-level entry of the repository or of a package directory,
or that ends in a file extension, e.g. ``docs/contract.md``, ``export/aligner_export/data/prompts/``,
``aligner_export/graph/locate.py``, ``models/smollm2-aligned/train.py``). A mention resolves against the file's
directory, the repository root, or ``export/`` / ``runtime/`` (package-relative paths). Files outside the repository
are never cited: a mention of ``../shared`` or of a design document that lives elsewhere fails outright.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Package-relative mentions (``aligner_export/graph/locate.py``, ``hf/export.py``, ``include/aligner_runtime.h``).
PACKAGE_ROOTS = (REPO / "export", REPO / "runtime", REPO / "export" / "aligner_export",
                 REPO / "runtime" / "aligner_runtime", REPO / "runtime" / "c")
EXTENSIONS = (".md", ".py", ".txt", ".json", ".jsonl", ".toml", ".h", ".cpp", ".cu", ".cmake", ".sh", ".c",
              ".safetensors", ".csv")
# Outputs and examples the documents name but that a user makes (``smollm2-steered/``, ``rep/report.md``), and
# the files an export or engine directory holds: a bare file name of this kind is not a reference into the repository.
NOT_REPOSITORY_FILES = {
    "model.onnx", "vision.onnx", "embed.onnx", "inferaligner.json", "ENGINE.json", "chat_template.jinja",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
    "report.json", "report.md", "report.png", "gate.png", "adapter_config.json", "results.json", "bench.json",
    "report.txt", "prompts.txt", "harmful.txt", "harmless.txt", "harmful_heldout.txt", "harmless_heldout.txt",
    "model.safetensors", "adapter_model.safetensors", "MANIFEST.json", "config.pbtxt", "bench_serving.json",
}
# Mentions that name something outside the repository on purpose, by document: the model cache's layout.
NOT_IN_REPOSITORY = {
    "models/README.md": {"models/smollm2-135m-instruct/", "models/smollm2-135m-instruct-aligned/"},
}
GENERATED = {"build", "smollm2-steered", "llava-steered", "rep", "cal", "repo"}  # what a make target or a command makes
DEAD = re.compile(r"\.\./shared|ARCHITECTURE\.md|DEVELOPERS\.md|STYLE\.md")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOKEN = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*")


def _documents() -> list[Path]:
    docs = [REPO / "README.md", REPO / "pyproject.toml", *sorted((REPO / "docs").glob("*.md"))]
    docs += sorted((REPO / "plugins").rglob("README.md")) + sorted((REPO / "models").rglob("README.md"))
    return docs


def _help_texts() -> dict[str, str]:
    from aligner_export.commands import cli as export_cli
    from aligner_runtime import cli as run_cli
    from aligner_runtime.serving import cli as serve_cli

    texts = {}
    parser = export_cli.build_parser()
    texts["aligner-export --help"] = parser.format_help()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, subparser in sub.choices.items():
        texts[f"aligner-export {name} --help"] = subparser.format_help()
    texts["aligner-run --help"] = run_cli.build_parser().format_help()
    texts["aligner-serve --help"] = serve_cli.build_parser().format_help()
    return texts


def _top_level_names() -> set[str]:
    names = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    for root in PACKAGE_ROOTS:
        names |= {p.name for p in root.iterdir() if p.is_dir()}
    return names


def _resolves(target: str, base: Path) -> bool:
    target = target.split("#", 1)[0].rstrip("/")
    if not target:
        return True
    return any((root / target).exists() for root in (base, REPO, *PACKAGE_ROOTS))


def dead_references(text: str, base: Path, allowed: set[str] = frozenset()) -> list[str]:
    """Every reference in ``text`` that does not resolve to a file or directory of the repository."""
    dead = [m.group(0) for m in DEAD.finditer(text)]
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of this page
        if not _resolves(target, base):
            dead.append(target)
    tops = _top_level_names()
    for match in TOKEN.finditer(text):
        start, token = match.start(), match.group(0).rstrip(".,;:")
        if start > 0 and text[start - 1] in "~/$<{*-=@:%+":
            continue  # an absolute or home path, a placeholder, a glob, an option value, a URL's tail
        end = match.end()
        if end < len(text) and text[end] in "*{<$":
            continue  # a glob or a placeholder inside the path (``*.safetensors``, ``layers.{l}``)
        first = token.split("/", 1)[0]
        if "/" in token:
            path_like = first in tops or token.endswith(EXTENSIONS)
        else:  # a bare module or file name names a file of the package being discussed; only pages are checked
            path_like = token.endswith(".md")
        if not path_like or token.startswith(".") or token in NOT_REPOSITORY_FILES or token in allowed:
            continue
        if first in GENERATED or (first.isupper() and len(first) > 0 and first.isalpha()):
            continue  # a build output, or a placeholder directory (``W/bench.json``, ``REPO/NAME/1/model.py``)
        if not _resolves(token, base):
            dead.append(token)
    return list(dict.fromkeys(dead))


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_document_references_exist(doc):
    name = doc.relative_to(REPO).as_posix()
    assert dead_references(doc.read_text(encoding="utf-8"), doc.parent, NOT_IN_REPOSITORY.get(name, set())) == []


def test_help_references_exist():
    dead = {name: refs for name, text in _help_texts().items() if (refs := dead_references(text, REPO))}
    assert dead == {}


def test_the_checker_finds_dead_references(tmp_path):
    """The checker itself: each kind of dead reference is found, and live ones pass."""
    text = ("See [the design](docs/nowhere.md), docs/missing.md and `export/aligner_export/data/nothing/`; "
            "../shared/ARCHITECTURE.md §4; aligner_export/graph/gone.py. "
            "Live: [contract](docs/contract.md), docs/architecture.md §5, `export/aligner_export/data/prompts/`, "
            "aligner_export/graph/locate.py, models/smollm2-aligned/README.md, ~/.cache/x.md, smollm2-steered/.")
    assert dead_references(text, REPO) == [
        "../shared", "ARCHITECTURE.md", "docs/nowhere.md", "docs/missing.md", "export/aligner_export/data/nothing/",
        "aligner_export/graph/gone.py"]
