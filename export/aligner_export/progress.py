"""Progress for the steps that take more than a few seconds (calibration, export, validation, quantisation,
evaluation): tqdm bars on stderr, cleared when done (``leave=False``), so that stdout keeps only the command's result
lines. A bar shows only when stderr is a terminal (``disable=None``): a log file or a pipe gets the result lines and,
on failure, the one error line, without bar residue."""

from __future__ import annotations

import sys


def bar(total: int, desc: str, unit: str):
    # deferred: tqdm is of the [export] extra; inspect, sign and triton run without it
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)


def iterate(iterable, desc: str, unit: str):
    """``iterable`` with a bar (its length known)."""
    # deferred: tqdm is of the [export] extra; inspect, sign and triton run without it
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None)


class Stages:
    """One bar over the named stages of a pipeline: the stage running is its postfix and the elapsed time shows that
    the work goes on. ``log`` prints a line above the bar (the bar is cleared for it and redrawn)."""

    def __init__(self, names, desc: str, log=print):
        self._names = list(names)
        self._log = log
        self._bar = bar(len(self._names), desc, "step")
        self._started = False

    def start(self, name: str) -> None:
        if name not in self._names:
            raise ValueError(f"unknown stage {name!r}")  # a programming error: the list is fixed up front
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(name)

    def log(self, message: str) -> None:
        # deferred: tqdm is of the [export] extra; inspect, sign and triton run without it
        from tqdm import tqdm

        with tqdm.external_write_mode():
            self._log(message)

    def close(self) -> None:
        if self._started:
            self._bar.update(1)
        self._bar.close()

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
