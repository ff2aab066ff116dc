"""User-facing errors.

Every error a user can cause (a wrong path, a mismatched pack, a malformed prompt file, an out-of-range layer)
is raised as :class:`AlignerError`. The CLIs print its message on one line and exit with status 2
(docs/architecture.md §7).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class AlignerError(Exception):
    """An error caused by the user's input. Its message is one line naming the problem."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temporary files, half-written outputs) runs."""


def _terminate(_signum, _frame):
    raise Terminated()


def run_cli(main: Callable[[], int | None]) -> int:
    """Runs a CLI entry point: user errors become one line on stderr and exit status 2; SIGINT and SIGTERM unwind
    the work (so atomic writes remove their temporary files) and exit with 130 and 143."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(main() or 0)
    except AlignerError as exc:
        # One line whatever the message quotes: a path or a prompt with a newline in it must not split it.
        message = str(exc).replace("\r", "\\r").replace("\n", "\\n")
        print(f"error: {message}", file=sys.stderr)
        return AlignerError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader went away (``... | head``): stop quietly, as a shell tool killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds.

    A failed run leaves nothing behind (docs/architecture.md §4).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise AlignerError(f"output directory does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the result honours the umask like any file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; moves it onto ``path`` only if the block succeeds. With
    ``replace`` an existing ``path`` (a cache entry being rebuilt) is removed just before the move; without it an
    existing non-empty ``path`` is refused before any work."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AlignerError(f"output directory's parent does not exist: {path.parent}")
    if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlignerError(f"output directory exists and is not empty: {path}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a service user must be able to read the export
        if path.is_dir() and (replace or not any(path.iterdir())):
            shutil.rmtree(path) if replace else path.rmdir()
        try:
            os.replace(tmp, path)
        except OSError as exc:  # another process wrote the same output meanwhile
            raise AlignerError(f"cannot move the finished output onto {path}: {exc.strerror} (was it written by "
                               f"another run meanwhile?); nothing was changed there") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Fails fast, before any work, when ``path`` cannot be written: its directory is missing or read-only, or it is a
    directory itself."""
    path = Path(path)
    if path.is_dir():
        raise AlignerError(f"{what} {path} is a directory")
    check_writable_dir(path.parent, f"{what}'s directory")
    return path


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise AlignerError(f"{what} does not exist: {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise AlignerError(f"{what} is not writable: {path}")
    return path


def check_count(value, what: str, low: int, high: int) -> int:
    """An integer option within ``[low, high]``, or one line naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AlignerError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def max_threads() -> int:
    """The most threads a thread option accepts: four per core this machine has."""
    return 4 * (os.cpu_count() or 1)


def argument_parser(**kwargs):
    """An ``argparse.ArgumentParser`` whose usage errors are one line, ``error: <prog>: <message>``, and exit 2 like
    every other user error (argparse's own prints the whole usage text first)."""
    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"error: {self.prog}: {' '.join(message.split())}\n")

    return OneLineParser(**kwargs)
