"""``--onnx FILE``: steering an ONNX LLM exported elsewhere (optimum, or a graph with ORT's fused skip-norms)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from aligner_export.commands.cli import main
from export_packs import make_pack


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory):
    from aligner_export.hf.base_export import base_export
    from aligner_export.hf.families import family_for
    from aligner_export.hf.modeling import load_model

    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("byo")
    pack = make_pack(model_dir, root / "pack.safetensors", gate_layer=2, steer_layers=(0, 1, 2, 3))
    model, _ = load_model(model_dir)
    plain, _ = base_export(model, root / "plain", family_for(model.config))
    return model_dir, pack, plain


def fused_graph(plain: Path, out: Path) -> Path:
    """The onnxruntime-genai builder's residual form: SkipSimplifiedLayerNormalization, whose output 3 is the sum."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    fused = optimizer.optimize_model(str(plain), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0)
    fused.save_model_to_file(str(out))
    count = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in onnx.load(str(out)).graph.node)
    if count < 7:
        pytest.skip(f"this onnxruntime's optimizer fused only {count} skip-norms; cannot build the test graph")
    return out


def export(model_dir, pack, onnx_file, out, *extra) -> dict:
    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "--onnx", str(onnx_file), "-o",
                 str(out), *extra]) == 0
    return json.loads((out / "inferaligner.json").read_text())


def test_optimum_file(llama, tmp_path):
    model_dir, pack, plain = llama
    manifest = export(model_dir, pack, plain, tmp_path / "out")
    assert manifest["exporter"] == "external"
    assert manifest["validation"]["decode_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_fused_skip_norm_graph(llama, tmp_path, impl):
    """Every layer steered, the gate in the middle: each steered fused node is split so the shift reaches the next
    layer's normalised input; validation against the PyTorch reference would fail otherwise."""
    model_dir, pack, plain = llama
    fused = fused_graph(plain, tmp_path / "fused.onnx")
    before = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in onnx.load(str(fused)).graph.node)
    manifest = export(model_dir, pack, fused, tmp_path / "out", "--steer-impl", impl)
    validation = manifest["validation"]
    assert max(validation["prefill_max_abs_diff"], validation["decode_max_abs_diff"]) <= 1e-4
    assert sorted(validation["gates"]) == [0.0, 1.0]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    after = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in graph.node)
    assert after < before


def test_steering_an_already_steered_graph_fails(llama, tmp_path, capsys):
    model_dir, pack, plain = llama
    export(model_dir, pack, plain, tmp_path / "once", "--no-validate")
    rc = main(["export", "--target", str(model_dir), "--pack", str(pack), "--onnx",
               str(tmp_path / "once" / "model.onnx"), "-o", str(tmp_path / "twice")])
    assert rc == 2 and "already steered" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_missing_onnx_file(llama, tmp_path, capsys):
    model_dir, pack, _ = llama
    rc = main(["export", "--target", str(model_dir), "--pack", str(pack), "--onnx", str(tmp_path / "nope.onnx"),
               "-o", str(tmp_path / "out")])
    assert rc == 2 and "not found" in capsys.readouterr().err
