"""Prompt files and jailbreak templates (ARCHITECTURE.md §7).

Formats: ``.txt`` (one prompt per line; blank lines and lines starting with ``#`` are skipped), ``.json`` (a list of
strings or of objects), ``.jsonl`` (one object per line), ``.csv`` (column ``goal`` as in AdvBench or ``Behavior`` as
in HarmBench). Objects give their prompt in ``instruction``, ``prompt``, ``goal`` or ``question``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import AlignerError

PROMPT_FIELDS = ("instruction", "prompt", "goal", "question")
CSV_COLUMNS = ("goal", "Behavior", "prompt", "instruction", "question")
TEMPLATE_SLOTS = ("{prompt}", "{{ prompt }}", "[INSERT PROMPT HERE]")
SUPPORTED_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")


def _from_object(obj: object, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in PROMPT_FIELDS:
            value = obj.get(key)
            if isinstance(value, str):
                return value
        raise AlignerError(f"{where}: object has none of the fields {', '.join(PROMPT_FIELDS)}")
    raise AlignerError(f"{where}: expected a string or an object, got {type(obj).__name__}")


def load_prompts(path: str | os.PathLike, min_count: int = 1) -> list[str]:
    """Reads a prompt file. Raises :class:`AlignerError` for a missing, unreadable, malformed or short file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise AlignerError(f"prompt file not found: {path}")
    if not path.is_file():
        raise AlignerError(f"prompt file is not a file: {path}")
    if suffix not in SUPPORTED_SUFFIXES:
        raise AlignerError(
            f"unknown prompt file format '{suffix or path.name}': use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AlignerError(f"cannot read prompt file {path}: {exc}") from None

    prompts: list[str]
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    elif suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise AlignerError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
            if data is None:
                raise AlignerError(f"{path}: a JSON prompt file holds a list (or an object with one list)")
        if not isinstance(data, list):
            raise AlignerError(f"{path}: a JSON prompt file holds a list")
        prompts = [_from_object(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AlignerError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            prompts.append(_from_object(obj, f"{path}:{lineno}"))
    else:
        rows = list(csv.DictReader(text.splitlines()))
        fields = rows[0].keys() if rows else []
        column = next((c for c in CSV_COLUMNS if c in fields), None)
        if rows and column is None:
            raise AlignerError(f"{path}: CSV has none of the columns {', '.join(CSV_COLUMNS)}")
        prompts = [row[column] or "" for row in rows] if column else []

    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise AlignerError(f"prompt file is empty: {path}")
    if len(prompts) < min_count:
        raise AlignerError(f"prompt file {path} has {len(prompts)} prompts; at least {min_count} are needed")
    return prompts


def load_templates(path: str | os.PathLike) -> list[str]:
    """Reads jailbreak templates: any prompt-file format (CSV column ``text`` too), each holding a prompt slot."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
        except (OSError, UnicodeDecodeError) as exc:
            raise AlignerError(f"cannot read template file {path}: {exc}") from None
        if rows and "text" in rows[0]:
            templates = [r["text"].strip() for r in rows if r.get("text") and r["text"].strip()]
        else:
            templates = load_prompts(path)
    else:
        templates = load_prompts(path)
    if not templates:
        raise AlignerError(f"template file is empty: {path}")
    for i, template in enumerate(templates):
        if not any(slot in template for slot in TEMPLATE_SLOTS):
            raise AlignerError(
                f"{path}: template {i} has no prompt slot ({' or '.join(TEMPLATE_SLOTS)})"
            )
    return templates


def apply_template(template: str, prompt: str) -> str:
    """Puts ``prompt`` into every slot of a jailbreak template."""
    for slot in TEMPLATE_SLOTS:
        template = template.replace(slot, prompt)
    return template


def prompts_sha256(prompts: Iterable[str]) -> str:
    """sha256 of a prompt list, as the pack records it (ARCHITECTURE.md §4): UTF-8, one prompt per line."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
