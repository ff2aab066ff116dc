"""Per-layer strengths (issue 17 §2, docs/contract.md "Manifest format 3"): ``--alpha-profile norm`` scales α by each
steered layer's residual norm, the manifest records every α_l, and the PyTorch reference rebuilt from the manifest
matches the export; the steering sweep (``aligner_export.tools.sweep``) over modes, profiles and end rules on a tiny
model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from aligner_export.graph import onnx_ops
from aligner_runtime.contract import Key, Manifest, check_manifest
from aligner_runtime.errors import AlignerError

NORMS = (2.0, 3.0, 5.0, 9.0)  # layer l's residual norm in the test pack


def _manifest(**extra):
    return {"format_version": 2, "num_layers": 4, "hidden_size": 8, "steer_layers": [2, 3], "gate_layer": 1,
            "alpha": 2.0, "bias": 0.0, **extra}


def test_manifest_alphas_default_to_alpha():
    facts = Manifest.from_json(_manifest(), "m")
    assert facts.alpha_per_layer is None and facts.alphas() == {2: 2.0, 3: 2.0}


def test_manifest_records_alpha_per_layer():
    facts = Manifest.from_json(_manifest(alpha_per_layer={"2": 1.5, "3": 2.5}), "m")
    assert facts.alphas() == {2: 1.5, 3: 2.5}


@pytest.mark.parametrize("value, match", [
    ({"2": 1.5}, "exactly the steered layers"),
    ({"2": 1.5, "3": 2.0, "1": 1.0}, "exactly the steered layers"),
    ({"2": 1.5, "3": -1.0}, "alpha_per_layer"),
    ({"2": 1.5, "3": "x"}, "alpha_per_layer"),
    ({"2": 1.5, "3": float("nan")}, "alpha_per_layer"),
    ([1.5, 2.5], "alpha_per_layer"),
])
def test_manifest_refuses_bad_alpha_per_layer(value, match):
    with pytest.raises(AlignerError, match=match):
        check_manifest(_manifest(alpha_per_layer=value), "m")


def test_steering_record_writes_per_layer_only_when_they_differ():
    from aligner_runtime.contract import SteerConfig, steering_record

    config = SteerConfig.single_layer(1, np.ones(4, np.float32), 0.0, {2: np.ones(4, np.float32),
                                                                      3: np.ones(4, np.float32)})
    assert Key.ALPHA_PER_LAYER not in steering_record(config, 2.0)
    assert Key.ALPHA_PER_LAYER not in steering_record(config, 2.0, {2: 2.0, 3: 2.0})
    assert steering_record(config, 2.0, {2: 1.0, 3: 3.0})[Key.ALPHA_PER_LAYER] == {"2": 1.0, "3": 3.0}


# --- packs and exports ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profile_pack(tiny_model_dir, tmp_path_factory):
    """A tiny llama's pack (gate at 2, layers 1-3 steered) whose per-layer stats carry residual norms, and the same
    pack without them (a pack made before issue 17)."""
    from export_packs import make_pack

    from aligner_export.pack import load_pack, save_pack

    model_dir = tiny_model_dir("llama")
    work = tmp_path_factory.mktemp("profile")
    old = make_pack(model_dir, work / "old.safetensors", gate_layer=2, steer_layers=(1, 2, 3))
    pack = load_pack(old)
    for stats, norm in zip(pack.meta["per_layer"], NORMS):
        stats["residual_norm"] = norm
    return model_dir, save_pack(pack, work / "pack.safetensors"), old


def test_pack_alphas(profile_pack):
    from aligner_export.pack import load_pack

    _, path, old = profile_pack
    pack = load_pack(path)
    assert pack.alphas([1, 2, 3], 4.0, "flat") == {1: 4.0, 2: 4.0, 3: 4.0}
    norm = pack.alphas([1, 2, 3], 4.0, "norm")
    mean = (3.0 + 5.0 + 9.0) / 3
    assert norm == pytest.approx({1: 4.0 * 3.0 / mean, 2: 4.0 * 5.0 / mean, 3: 4.0 * 9.0 / mean})
    assert np.mean(list(norm.values())) == pytest.approx(4.0)  # the accumulated shift of the block is α's
    with pytest.raises(AlignerError, match="no residual norms per layer"):
        load_pack(old).alphas([1, 2, 3], 4.0, "norm")


def test_pack_refuses_a_negative_residual_norm(profile_pack, tmp_path):
    from aligner_export.pack import load_pack, save_pack

    pack = load_pack(profile_pack[1])
    pack.meta["per_layer"][1]["residual_norm"] = -1.0
    with pytest.raises(AlignerError, match="residual_norm"):
        save_pack(pack, tmp_path / "bad.safetensors")


def _export(model_dir, pack, out, *extra) -> dict:
    from aligner_export.commands.cli import main

    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "-o", str(out), "--no-validate",
                 *extra]) == 0
    return json.loads((out / "inferaligner.json").read_text())


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_norm_profile_export_against_reference(profile_pack, tmp_path, impl):
    """The graph's SteerShift vectors are α_l·θ_l (θ unit), the manifest records α_l, and ORT matches the PyTorch
    reference rebuilt from the manifest (mixed gates, prefill and decode steps); the flat reference does not."""
    from aligner_export.hf.modeling import load_model
    from aligner_export.hf.validate import validate
    from aligner_export.pack import load_pack

    model_dir, path, _ = profile_pack
    manifest = _export(model_dir, path, tmp_path / "out", "--alpha-profile", "norm", "--alpha", "4",
                       "--steer-impl", impl)
    mean = (3.0 + 5.0 + 9.0) / 3
    expected = {str(l): 4.0 * n / mean for l, n in zip((1, 2, 3), NORMS[1:])}
    assert manifest[Key.ALPHA_PER_LAYER] == pytest.approx(expected) and manifest[Key.ALPHA] == 4.0
    pack = load_pack(path)
    spec = pack.config_of_export(manifest)
    for layer in (1, 2, 3):
        assert np.linalg.norm(spec.vectors[layer]) == pytest.approx(expected[str(layer)], rel=1e-5)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    if impl == "function":
        shifts = {n.name: onnx_ops.node_attr(n, "vector") for n in graph.graph.node if n.op_type == "SteerShift"}
        norms = sorted(float(np.linalg.norm(v)) for v in shifts.values())
        assert norms == pytest.approx(sorted(expected.values()), rel=1e-5)
    model, tokenizer = load_model(model_dir)
    result = validate(tmp_path / "out" / "model.onnx", model, tokenizer, spec)
    assert result.prefill_max_abs_diff <= 1e-4 and result.decode_max_abs_diff <= 1e-4
    flat = pack.steer_config(spec.steer_layers, 4.0, spec.gate, steer_impl=impl)
    off = validate(tmp_path / "out" / "model.onnx", model, tokenizer, replace(flat, steer_impl=impl),
                   tolerance=1e9)
    assert max(off.prefill_max_abs_diff, off.decode_max_abs_diff) > 1e-3


def test_flat_profile_writes_no_per_layer_key(profile_pack, tmp_path):
    model_dir, path, _ = profile_pack
    manifest = _export(model_dir, path, tmp_path / "out")
    assert Key.ALPHA_PER_LAYER not in manifest


def test_norm_profile_needs_residual_norms(profile_pack, tmp_path, capsys):
    from aligner_export.commands.cli import main

    model_dir, _, old = profile_pack
    code = main(["export", "--target", str(model_dir), "--pack", str(old), "-o", str(tmp_path / "out"),
                 "--no-validate", "--alpha-profile", "norm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no residual norms per layer" in err[0]
    assert not (tmp_path / "out" / "inferaligner.json").exists()


# --- the sweep -----------------------------------------------------------------------------------------------------

def test_sweep_parsers():
    from aligner_export.tools import sweep
    from aligner_runtime.contract import EndRule

    assert sweep.parse_end_rule("none", EndRule(after=8, slope=1.0)) == ("none", EndRule())
    assert sweep.parse_end_rule("pack", EndRule(after=8, slope=1.0)) == ("8:1", EndRule(after=8, slope=1.0))
    assert sweep.parse_end_rule("4:0.5", EndRule())[1] == EndRule(after=4, slope=0.5)
    for bad in ("4", "x:1", "4:-1", "99999:1"):
        with pytest.raises(AlignerError):
            sweep.parse_end_rule(bad, EndRule())
    assert sweep.parse_block("3-5") == [3, 4, 5]
    for bad in ("5-3", "a-b", "1-99999"):
        with pytest.raises(AlignerError):
            sweep.parse_block(bad)


def test_sweep_shapes_prompts_like_harmbench():
    from aligner_export.tools import sweep

    shaped = sweep.harmful_prompts("corpus", ["harmfulqa"], 9, 0, "harmbench")
    assert [s for _, s in shaped] == ["plain", "context", "roleplay"] * 3
    plain = dict(zip(range(9), sweep.harmful_prompts("corpus", ["harmfulqa"], 9, 0, "plain")))
    for i, (text, shape) in enumerate(shaped):
        assert plain[i][0] in text  # the same request, shaped
        if shape == "context":
            assert text.index("\n\n---\n\n") >= sweep.CONTEXT_CHARS[0]
        else:
            assert len(text) < len(plain[i][0]) + 200
    with pytest.raises(AlignerError, match="no harmful calibration prompts"):
        sweep.harmful_prompts("corpus", ["no-such-source"], 3, 0, "plain")


def test_sweep_runs_every_configuration(profile_pack, tmp_path, capsys):
    """Two modes × two profiles × two end rules on a tiny model: eight rows, and the end rule that forces an end of
    sequence from the second new token ends every steered answer there."""
    from aligner_export.tools import sweep

    model_dir, path, _ = profile_pack
    out, table, png = tmp_path / "sweep.json", tmp_path / "sweep.md", tmp_path / "sweep.png"
    code = sweep.main(["--target", str(model_dir), "--pack", str(path), "--blocks", "1-3", "--modes", "add,norm",
                       "--profiles", "flat,norm", "--end-rules", "none,0:100", "--limit", "3", "--shape", "plain", "--harmless-sources", "self_instruct_seed",
                       "--harmless-limit", "2", "--max-new-tokens", "6", "--threads", "1",
                       "--work", str(tmp_path / "work"), "--out", str(out), "--table", str(table),
                       "--plot", str(png)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 8
    assert {(r["mode"], r["profile"], r["end_rule"]) for r in rows} == \
        {(m, p, e) for m in ("add", "norm") for p in ("flat", "norm") for e in ("none", "0:100")}
    assert all(r["count"] == 3 and r["harmless_count"] == 2 for r in rows)
    ended = [r for r in rows if r["end_rule"] == "0:100"]
    assert all(r["stopped"] == 1.0 and r["mean_tokens"] <= 2 for r in ended)
    assert max(r["mean_tokens"] for r in rows if r["end_rule"] == "none") > 2
    assert len(table.read_text().strip().splitlines()) == 2 + 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "work").iterdir())) == 4  # one export per (block, mode, profile)


def test_sweep_refuses_bad_grids(profile_pack, tmp_path, capsys):
    from aligner_export.tools import sweep

    model_dir, path, _ = profile_pack
    base = ["--target", str(model_dir), "--pack", str(path), "--work", str(tmp_path / "w")]
    for extra, match in ((["--modes", "scale"], "--modes"), (["--profiles", "steep"], "--profiles"),
                         (["--blocks", "1-40"], "out of range"), (["--strengths", "0"], "--strengths"),
                         (["--end-rules", "x"], "--end-rules"), (["--limit", "0"], "--limit")):
        assert sweep.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (extra, err)
    assert not (tmp_path / "w").exists()
