"""Every bad input to ``aligner-export export``: one line on stderr, exit status 2, no OUTDIR left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aligner_runtime.errors import AlignerError

from aligner_export.commands.cli import main
from export_packs import make_pack


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    pack = make_pack(model_dir, tmp_path_factory.mktemp("errpack") / "pack.safetensors", bias=0.0)
    return model_dir, pack


def run_export(capsys, out: Path, *args: str) -> str:
    rc = main(["export", "-o", str(out), "--no-validate", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not out.exists(), "a failed export must leave no OUTDIR"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("args, message", [
    (["--steer-layers", "2-9"], "out of range"),
    (["--gate-layer", "4"], "out of range"),
    (["--gate-layer", "-1"], "out of range"),
    (["--steer-layers", "3-1"], "empty"),
    (["--steer-layers", "two"], "cannot parse"),
    (["--alpha", "nan"], "alpha"),
    (["--alpha", "0"], "alpha"),
    (["--alpha", "-4"], "alpha"),
])
def test_bad_options(llama, tmp_path, capsys, args, message):
    model_dir, pack = llama
    err = run_export(capsys, tmp_path / "out", "--target", str(model_dir), "--pack", str(pack), *args)
    assert message in err


def test_pack_for_another_model(llama, tiny_model_dir, tmp_path, capsys):
    model_dir, _ = llama
    other = make_pack(tiny_model_dir("llama", seed=1), tmp_path / "other.safetensors", bias=0.0)
    err = run_export(capsys, tmp_path / "out", "--target", str(model_dir), "--pack", str(other))
    assert "another model" in err and "--force" in err
    # --force accepts it (the gate vectors have the right shapes).
    out = tmp_path / "forced"
    assert main(["export", "-o", str(out), "--no-validate", "--force", "--target", str(model_dir), "--pack",
                 str(other)]) == 0
    assert (out / "inferaligner.json").is_file()


def test_pack_of_another_shape(tiny_model_dir, llama, tmp_path, capsys):
    model_dir, _ = llama
    wide = make_pack(tiny_model_dir("llama", hidden_size=32), tmp_path / "wide.safetensors", bias=0.0)
    err = run_export(capsys, tmp_path / "out", "--target", str(model_dir), "--pack", str(wide))
    assert "another model" in err


def test_pack_of_unknown_format_version(llama, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    model_dir, pack = llama
    with safe_open(str(pack), framework="np") as fh:
        meta = json.loads(fh.metadata()["inferaligner"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["format_version"] = 99
    bad = tmp_path / "v99.safetensors"
    save_file(tensors, str(bad), metadata={"inferaligner": json.dumps(meta)})
    err = run_export(capsys, tmp_path / "out", "--target", str(model_dir), "--pack", str(bad))
    assert "format version" in err


def test_unsupported_architecture(llama, tmp_path, capsys):
    model_dir, pack = llama
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(model_dir, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    config["architectures"] = ["GPT2ForCausalLM"]
    (gpt2 / "config.json").write_text(json.dumps(config))
    err = run_export(capsys, tmp_path / "out", "--target", str(gpt2), "--pack", str(pack))
    assert "unsupported architecture" in err and "llama" in err and "qwen3" in err


def test_model_dir_without_weights(llama, tmp_path, capsys):
    model_dir, pack = llama
    empty = tmp_path / "noweights"
    empty.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(model_dir / name, empty / name)
    err = run_export(capsys, tmp_path / "out", "--target", str(empty), "--pack", str(pack))
    assert "no weights" in err


def test_output_dir_not_empty(llama, tmp_path, capsys):
    model_dir, pack = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["export", "-o", str(out), "--target", str(model_dir), "--pack", str(pack)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_validation_leaves_nothing(llama, tmp_path, capsys, monkeypatch):
    """A failure late in the pipeline (here: validation) still leaves no OUTDIR."""
    from aligner_export.hf import validate

    model_dir, pack = llama
    monkeypatch.setitem(validate.TOLERANCE, "fp32", (0.0, 0.0))
    out = tmp_path / "out"
    rc = main(["export", "-o", str(out), "--target", str(model_dir), "--pack", str(pack),
               "--steer-layers", "0-3", "--alpha", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "validation failed" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_parse_layers():
    from aligner_export.commands.export import parse_layers

    assert parse_layers("1-3", 4, "x") == [1, 2, 3]
    assert parse_layers("0,2,3", 4, "x") == [0, 2, 3]
    assert parse_layers("2", 4, "x") == [2]
    with pytest.raises(AlignerError, match="empty range"):
        parse_layers("3-1", 4, "x")
    # Bounds are checked on the numbers, before a list is built (issue 14): this returns at once.
    with pytest.raises(AlignerError, match="layer 300000000 out of range"):
        parse_layers("0-300000000", 30, "x")
    with pytest.raises(AlignerError, match="cannot parse"):
        parse_layers("0-99999999999999999999", 30, "x")
