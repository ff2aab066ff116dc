"""Prompt files and jailbreak templates (docs/architecture.md §7).

Formats: ``.txt`` (one prompt per line; blank lines and lines starting with ``#`` are skipped), ``.json`` (a list of
strings or of objects), ``.jsonl`` (one object per line), ``.csv`` (column ``goal`` as in AdvBench or ``Behavior`` as
in HarmBench). Objects give their prompt in ``instruction``, ``prompt``, ``goal`` or ``question``.

Multimodal prompt files (issue 6, the MM-Harmful Bench layout): ``.jsonl`` or ``.json`` objects that also name an
image in ``image`` (or ``image_url``, ``image_path``, ``img``): a local path, relative to the prompt file's directory,
or a ``file://`` URL. :func:`load_prompt_items` returns the prompts with their images; :func:`load_prompts` returns
the texts only (calibration is text-only, as in the paper).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable

from . import schema
from .errors import AlignerError

PROMPT_FIELDS = ("instruction", "prompt", "goal", "question", "text")
MAX_PROMPT_FILE_BYTES = 64 << 20  # checked on the file's size, before it is read
MAX_PROMPTS = 100_000  # prompts (or templates) one file may hold; counted as the file is parsed
MAX_FIELD_BYTES = 16 << 20  # one CSV field (Python's csv module stops at 128 KiB unless told)
IMAGE_FIELDS = ("image", "image_url", "image_path", "img")
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


def _shown(text: str, limit: int = 200) -> str:
    """``text`` from a prompt file as an error shows it: on one line (repr when it holds line breaks or other
    unprintable characters) and at most ``limit`` characters."""
    return text[:limit] if text.isprintable() else repr(text[:limit])


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a prompt file and the images it names (resolved paths; empty for text)."""

    text: str
    images: tuple[Path, ...] = ()


def _image_of(obj: object, base: Path, where: str) -> tuple[Path, ...]:
    if not isinstance(obj, dict):
        return ()
    key = next((k for k in IMAGE_FIELDS if obj.get(k) not in (None, "")), None)
    if key is None:
        return ()
    value = obj[key]
    if not isinstance(value, str):
        raise AlignerError(f"{where}: field {key} must be a path string, got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise AlignerError(f"{where}: {key} {_shown(value)} is a web address; give a local path (nothing is "
                           f"downloaded)")
    if value.startswith("file://"):
        value = value[len("file://"):]
    try:
        image = Path(value).expanduser()  # "~user/..." of an unknown user is a RuntimeError
        image = image if image.is_absolute() else base / image
        found = image.is_file()  # a name too long for the file system is an OSError
    except (RuntimeError, OSError, ValueError):
        raise AlignerError(f"{where}: {key} {_shown(value)} is not a usable image path") from None
    if not found:
        raise AlignerError(f"{where}: image not found: {_shown(str(image))}")
    return (image,)


def load_prompts(path: str | os.PathLike, min_count: int = 1) -> list[str]:
    """Reads a prompt file (texts only). Raises :class:`AlignerError` for a missing, unreadable, malformed or short
    file."""
    return [item.text for item in load_prompt_items(path, min_count, images=False)]


def _read_text(path: Path, what: str) -> str:
    """A prompt or template file's text: at most ``MAX_PROMPT_FILE_BYTES`` (checked before reading), UTF-8, or one
    line naming the file."""
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise AlignerError(f"{what} {path} is over {MAX_PROMPT_FILE_BYTES >> 20} MiB")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AlignerError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise AlignerError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_prompt_items(path: str | os.PathLike, min_count: int = 1, images: bool = True) -> list[PromptItem]:
    """Reads a prompt file with the images its JSON/JSONL objects name (checked to exist when ``images``)."""
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
    text = _read_text(path, "prompt file")

    def _item(obj: object, where: str) -> PromptItem:
        return PromptItem(_from_object(obj, where), _image_of(obj, path.parent, where) if images else ())

    def too_many():
        raise AlignerError(f"prompt file {path} holds more than {MAX_PROMPTS} prompts (split it)")

    prompts: list
    if suffix == ".txt":
        prompts = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                if len(prompts) >= MAX_PROMPTS:
                    too_many()
                prompts.append(line)
    elif suffix == ".json":
        data = schema.loads(text, str(path)) if text.strip() else []
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
            if data is None:
                raise AlignerError(f"{path}: a JSON prompt file holds a list (or an object with one list)")
        if not isinstance(data, list):
            raise AlignerError(f"{path}: a JSON prompt file holds a list")
        if len(data) > MAX_PROMPTS:
            too_many()
        prompts = [_item(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if len(prompts) >= MAX_PROMPTS:
                too_many()
            prompts.append(_item(schema.loads(line, f"{path}:{lineno}"), f"{path}:{lineno}"))
    else:
        rows = _csv_rows(text, path)
        fields = rows[0].keys() if rows else []
        column = next((c for c in CSV_COLUMNS if c in fields), None)
        if rows and column is None:
            raise AlignerError(f"{path}: CSV has none of the columns {', '.join(CSV_COLUMNS)}")
        # HarmBench's contextual behaviours: the context goes above the request, as HarmBench prompts them.
        context = "ContextString" if "ContextString" in fields else None
        prompts = [(f"{row[context]}\n\n---\n\n{row[column] or ''}" if context and row.get(context) else
                    row[column] or "") for row in rows] if column else []

    items = [p if isinstance(p, PromptItem) else PromptItem(p) for p in prompts]
    prompts = [PromptItem(p.text.strip(), p.images) for p in items if p.text and p.text.strip()]
    if not prompts:
        raise AlignerError(f"prompt file is empty: {path}")
    if len(prompts) < min_count:
        raise AlignerError(f"prompt file {path} has {len(prompts)} prompts; at least {min_count} are needed")
    return prompts


def _csv_rows(text: str, path: Path) -> list[dict]:
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        rows = list(itertools.islice(csv.DictReader(text.splitlines()), MAX_PROMPTS + 1))
    except csv.Error as exc:
        raise AlignerError(f"{path}: not a readable CSV file ({exc})") from None
    if len(rows) > MAX_PROMPTS:
        raise AlignerError(f"{path} holds more than {MAX_PROMPTS} rows (split it)")
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):  # a row with more or fewer fields than the header
            raise AlignerError(f"{path}: CSV row {i + 2} does not match the header")
    return rows


def load_templates(path: str | os.PathLike) -> list[str]:
    """Reads jailbreak templates: any prompt-file format (CSV column ``text`` too), each holding a prompt slot."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        text = _read_text(path, "template file")
        rows = _csv_rows(text, path)
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
    """sha256 of a prompt list, as the pack records it (docs/architecture.md §4): UTF-8, one prompt per line."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
