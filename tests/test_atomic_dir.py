"""``errors.atomic_dir``: the output appears whole or not at all, an existing output is refused before any work, and
a race with another writer of the same output is one clear error, not a traceback."""

from __future__ import annotations

import pytest

from aligner_runtime.errors import AlignerError, atomic_dir


def test_the_output_appears_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("failed midway")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("whole")
    assert (out / "a.txt").read_text() == "whole"


def test_an_existing_output_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AlignerError, match="exists and is not empty"):
        with atomic_dir(out):
            pytest.fail("the block must not run")
    assert (out / "keep.txt").read_text() == "x"


def test_another_writer_meanwhile_is_one_clear_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AlignerError, match="written by another run meanwhile") as info:
        with atomic_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()  # another export finished first
            (out / "theirs.txt").write_text("theirs")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # our temporary directory is gone
