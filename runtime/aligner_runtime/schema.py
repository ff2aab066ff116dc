"""Typed reads of untrusted JSON (pack metadata, manifests, stamps, requests): every value is checked for its kind
and range before anything uses it, so a file or request of the wrong shape is one :class:`AlignerError` naming the
field, never a ``KeyError``, ``TypeError`` or a NaN that slips through (issue 14).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import AlignerError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MISSING = object()
MAX_DEPTH = 64  # nesting of arrays and objects; every file the package writes stays under 10


def _fail(where: str, key: str, what: str):
    # repr: a key read from the file stays on one line, whatever characters it holds
    raise AlignerError(f"{where}: {key!r} {what}")


def field(obj, key: str, kind: str, where: str, *, default=MISSING, lo=None, hi=None, choices=None,
          max_items: int = 100_000):
    """``obj[key]`` checked to be of ``kind``:

    - ``bool``, ``int`` (not bool), ``float`` (finite; ints accepted), ``str``, ``sha256`` (64 lowercase hex);
    - ``int_list`` (a list of ints), ``float_list`` (finite), ``str_list``, ``dict``, ``list``;

    ``lo``/``hi`` bound numbers and the items of number lists, ``choices`` the allowed values. A missing key is an
    error unless ``default`` is given.
    """
    if not isinstance(obj, dict):
        raise AlignerError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        if default is MISSING:
            _fail(where, key, "is missing")
        return default
    value = obj[key]
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(where, key, f"must be true or false, got {value!r:.40}")
    elif kind in ("int", "float"):
        value = _number(value, kind, where, key, lo, hi)
    elif kind in ("str", "sha256"):
        if not isinstance(value, str):
            _fail(where, key, f"must be a string, got {type(value).__name__}")
        if kind == "sha256" and not _HEX64.match(value):
            _fail(where, key, "must be a sha256 digest (64 lowercase hex digits)")
    elif kind in ("int_list", "float_list", "str_list", "list"):
        if not isinstance(value, list):
            _fail(where, key, f"must be a list, got {type(value).__name__}")
        if len(value) > max_items:
            _fail(where, key, f"has {len(value)} items (at most {max_items})")
        if kind == "str_list" and not all(isinstance(v, str) for v in value):
            _fail(where, key, "must be a list of strings")
        if kind in ("int_list", "float_list"):
            value = [_number(v, kind[:-5], where, key, lo, hi) for v in value]
    elif kind == "dict":
        if not isinstance(value, dict):
            _fail(where, key, f"must be a JSON object, got {type(value).__name__}")
    else:
        raise ValueError(f"unknown kind {kind}")
    if choices is not None and value not in choices:
        _fail(where, key, f"must be one of {', '.join(map(str, choices))}, got {value!r:.40}")
    return value


def _number(value, kind: str, where: str, key: str, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, key, f"must be a number, got {type(value).__name__}")
    if kind == "int":
        if not isinstance(value, int):
            _fail(where, key, f"must be an integer, got {value!r:.40}")
    else:
        try:
            value = float(value)  # an integer past the float range overflows here, not in a later use
        except OverflowError:
            _fail(where, key, "must be finite, got an integer beyond the float range")
        if not math.isfinite(value):
            _fail(where, key, f"must be finite, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(where, key, f"must be within [{lo}, {hi}], got {value!r:.40}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _too_deep(value) -> bool:
    """Whether ``value`` nests arrays and objects more than :data:`MAX_DEPTH` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def first_line(exc: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message (its type when the message is empty), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def read_bounded(path, limit: int, what: str) -> bytes:
    """The bytes of an untrusted file, refused from its size before anything is read when it is over ``limit``
    (``what`` names it in the one-line error: "the manifest", "signing key")."""
    path = Path(path)
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
    try:
        if path.stat().st_size > limit:
            raise AlignerError(f"{what} {path} is over {size}")
        return path.read_bytes()
    except OSError as exc:
        raise AlignerError(f"cannot read {what} {path}: {exc.strerror}") from None


def loads(text, where: str, *, constants: bool = False):
    """``json.loads`` for untrusted text: NaN and Infinity literals, invalid UTF-8, integers too long to convert and
    nesting deeper than :data:`MAX_DEPTH` (which no file of the package holds, and which would make any recursive use
    of the value, a ``repr`` included, overflow the stack) are one :class:`AlignerError`. ``constants`` lets NaN and
    Infinity through, for third-party files that Python's ``json.dump`` may have written with them."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=None if constants else _no_constant)
    except UnicodeDecodeError:
        raise AlignerError(f"{where}: not valid UTF-8") from None
    except RecursionError:
        raise AlignerError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, the NaN refusal and the int-digits limit are ValueErrors
        raise AlignerError(f"{where}: not valid JSON ({first_line(exc, 80)})") from None
    if _too_deep(value):
        raise AlignerError(f"{where}: JSON nested more than {MAX_DEPTH} deep")
    return value
