"""``aligner-export inspect``: a pack, an export dir, a bare .onnx (steered or not) and an engine stamp; no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aligner_export.commands.cli import main
from export_packs import make_pack


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("qwen2")
    root = tmp_path_factory.mktemp("inspect")
    pack = make_pack(model_dir, root / "pack.safetensors", gate_layer=2, steer_layers=(1, 3))
    out = root / "out"
    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "-o", str(out)]) == 0
    inline = root / "inline"
    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "-o", str(inline), "--steer-impl",
                 "inline", "--alpha", "2", "--no-validate"]) == 0
    return pack, out, inline


def inspect(capsys, *args) -> str:
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_export_dir(exported, capsys):
    _, out, _ = exported
    text = inspect(capsys, out)
    assert "steered: yes" in text
    assert "SteerShift after layers [1, 3]; SteerGate v1 at layer [2] (function; plugin [SteerGate/1, SteerShift/1])" \
        in text
    assert "two-pass prefill" in text
    assert "vector norms (alpha * ssv): 1: 4, 3: 4" in text
    assert "alpha 4," in text and "(paper)" in text
    manifest = json.loads((out / "inferaligner.json").read_text())
    assert manifest["target_fingerprint"] in text
    assert "validation: passed" in text and "tolerance 0.0001" in text


def test_bare_onnx_inline_reads_graph_and_metadata(exported, capsys):
    _, _, inline = exported
    text = inspect(capsys, inline / "model.onnx")
    assert text.startswith("onnx: ")
    assert "SteerGate v1 at layer [2] (inline" in text
    assert "vector norms (alpha * ssv): 1: 2, 3: 2" in text
    assert "validation: not run" in text
    info = json.loads(inspect(capsys, inline / "model.onnx", "--json"))
    assert info["graph"]["steered"] and info["metadata_matches_graph"]
    assert info["metadata"]["alpha"] == 2.0


def test_unsteered_onnx(tiny_model_dir, tmp_path, capsys):
    from aligner_export.hf.base_export import base_export
    from aligner_export.hf.families import family_for
    from aligner_export.hf.modeling import load_model

    model, _ = load_model(tiny_model_dir("qwen2"))
    path, _ = base_export(model, tmp_path / "plain", family_for(model.config))
    text = inspect(capsys, path)
    assert "steered: NO" in text and "no inferaligner metadata" in text


def test_pack(exported, capsys):
    pack, _, _ = exported
    text = inspect(capsys, pack)
    assert "recommended: paper gate; paper gate layer 2, steer layers [1, 3], alpha 4, bias rule paper" in text
    assert "vector norms (alpha * ssv): 1: 4, 3: 4" in text


def test_engine_stamp(tmp_path, capsys):
    stamp = {"format_version": 1, "trt_version": "10.3.0", "compute_capability": "8.7", "engine_file": "model.engine",
             "manifest_sha256": "ab" * 32, "precision": "fp16"}
    (tmp_path / "ENGINE.json").write_text(json.dumps(stamp))
    (tmp_path / "model.engine").write_bytes(b"\0")
    text = inspect(capsys, tmp_path / "model.engine")
    assert "tensorrt engine" in text and "trt_version: 10.3.0" in text and "compute_capability: 8.7" in text


def test_bad_paths(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["inspect", str(tmp_path / "junk.onnx")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    assert main(["inspect", str(tmp_path / "junk.onnx").replace(".onnx", ".txt")]) == 2
    err = capsys.readouterr().err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())


def test_inspect_imports_no_torch(exported):
    _, out, _ = exported
    code = ("import sys; from aligner_export.commands.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'inspect imported torch'")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True, cwd=Path(__file__).parent)
