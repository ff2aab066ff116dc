"""SteerShift version 2 ("norm", issue 17; docs/contract.md "SteerShift version 2"): the ONNX function and its inline
form run by ONNX Runtime against the numpy oracle and the PyTorch reference's shift, the contract's registry and the
manifest key, and tiny real exports in mode "norm" against the PyTorch reference (mixed gates in one batch, prefill and
decode, left and right padding)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import op_oracles
from aligner_export.graph import onnx_ops
from aligner_runtime import contract
from aligner_runtime.contract import Key, Manifest, SteerConfig, check_manifest
from aligner_runtime.errors import AlignerError

ort = pytest.importorskip("onnxruntime")

SHIFT = "/model/layers.1/steer/SteerShift"
ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def shift_model(H: int, vector, version: int, dtype=np.float32, impl: str = "function", opset: int = 17):
    node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", vector, SHIFT, version)
    nodes, functions = [node], onnx_ops.function_protos(opset, 1, version)
    if impl == "inline":
        nodes, functions = onnx_ops.inline_nodes(node, opset), []
    graph = helper.make_graph(nodes, "shift",
                              [helper.make_tensor_value_info("hidden", ONNX_TYPES[dtype], ["B", "S", H]),
                               helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["B"])],
                              [helper.make_tensor_value_info("out", ONNX_TYPES[dtype], ["B", "S", H])])
    imports = [helper.make_opsetid("", opset)]
    if impl == "function":
        imports.append(helper.make_opsetid(onnx_ops.DOMAIN, version))
    model = helper.make_model(graph, opset_imports=imports, functions=functions, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_shift(model, hidden, gate):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["out"], {"hidden": hidden, "gate": np.asarray(gate, np.float32)})[0]


def torch_shift(hidden, gate, vector, mode="norm"):
    import torch

    from aligner_export.hf.reference import shift_hidden

    out = shift_hidden(torch.from_numpy(hidden), torch.from_numpy(np.asarray(gate, np.float32)),
                       torch.from_numpy(np.asarray(vector, np.float32)), mode)
    return out.numpy()


# Mixed gates in one batch: off, on, a forced fraction, a strong one.
GATES = np.array([0.0, 1.0, 0.5, 3.0], np.float32)


@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("S", [5, 1], ids=["prefill", "decode"])
def test_norm_matches_oracle_and_reference(impl, dtype, S):
    H = 32
    rng = np.random.default_rng(S)
    hidden = (rng.normal(size=(len(GATES), S, H)) * 4).astype(dtype)
    vector = (rng.normal(size=H) * 3).astype(np.float32)
    out = run_shift(shift_model(H, vector, 2, dtype, impl), hidden, GATES)
    assert out.dtype == dtype
    expected = op_oracles.steer_shift_norm(hidden, GATES, vector)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), **tol)
    np.testing.assert_allclose(torch_shift(hidden, GATES, vector).astype(np.float32), expected.astype(np.float32),
                               **tol)
    # The shift moved the steered rows and kept each position's norm.
    h32, o32 = hidden.astype(np.float32), out.astype(np.float32)
    assert np.abs(o32[1:] - h32[1:]).max() > 0.1
    np.testing.assert_allclose(np.linalg.norm(o32, axis=-1), np.linalg.norm(h32, axis=-1),
                               rtol=1e-5 if dtype == np.float32 else 2e-3)


@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gate_zero_rows_are_bit_identical(impl, dtype):
    H = 24
    rng = np.random.default_rng(7)
    hidden = (rng.normal(size=(3, 4, H)) * 100).astype(dtype)
    hidden[0, 0, :3] = [-0.0, 0.0, -0.0]  # the sign of a zero survives too
    gate = np.array([0.0, 1.0, 0.0], np.float32)
    vector = rng.normal(size=H).astype(np.float32)
    out = run_shift(shift_model(H, vector, 2, dtype, impl), hidden, gate)
    for b in (0, 2):
        assert out[b].tobytes() == hidden[b].tobytes()
    assert out[1].tobytes() != hidden[1].tobytes()
    assert torch_shift(hidden, gate, vector)[0].tobytes() == hidden[0].tobytes()
    assert op_oracles.steer_shift_norm(hidden, gate, vector)[0].tobytes() == hidden[0].tobytes()


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_degenerate_rows(impl):
    """A zero hidden state stays zero (its norm is 0); a shift that cancels the state (y = 0) gives 0, not NaN, by the
    1e-6 floor on ‖y‖."""
    H = 8
    vector = np.arange(1, H + 1, dtype=np.float32)
    hidden = np.zeros((2, 1, H), np.float32)
    hidden[1, 0] = -vector
    out = run_shift(shift_model(H, vector, 2, impl=impl), hidden, np.array([1.0, 1.0], np.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, np.zeros_like(out))
    np.testing.assert_array_equal(op_oracles.steer_shift_norm(hidden, [1.0, 1.0], vector), np.zeros_like(out))
    np.testing.assert_array_equal(torch_shift(hidden, [1.0, 1.0], vector), np.zeros_like(out))


def test_add_mode_is_unchanged():
    H = 16
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(4, 3, H)).astype(np.float32)
    vector = rng.normal(size=H).astype(np.float32)
    out = run_shift(shift_model(H, vector, 1), hidden, GATES)
    np.testing.assert_array_equal(out, op_oracles.steer_shift(hidden, GATES, vector))
    np.testing.assert_array_equal(torch_shift(hidden, GATES, vector, "add"), out)


def test_nodes_and_functions_carry_the_version():
    vector = np.ones(4, np.float32)
    node = onnx_ops.make_steer_shift_node("h", "g", "o", vector, SHIFT, 2)
    assert onnx_ops.node_attr(node, "plugin_version") == "2"
    assert [a.name for a in node.attribute if a.name not in contract.PLUGIN_ATTRIBUTES] == ["vector"]
    assert onnx_ops.node_attr(onnx_ops.make_steer_shift_node("h", "g", "o", vector, SHIFT), "plugin_version") == "1"
    with pytest.raises(ValueError, match="SteerShift version 3"):
        onnx_ops.make_steer_shift_node("h", "g", "o", vector, SHIFT, 3)
    with pytest.raises(ValueError, match="SteerShift version 3"):
        onnx_ops.function_protos(17, 1, 3)
    bodies = {v: onnx_ops.function_protos(17, 1, v)[1] for v in (1, 2)}
    assert bodies[1].SerializeToString() != bodies[2].SerializeToString()
    # The inline body keeps the constant under {node}/vector, where the integrity digest looks for it.
    inlined = onnx_ops.inline_nodes(node, 17)
    assert any(n.op_type == "Constant" and list(n.output) == [f"{SHIFT}/vector"] for n in inlined)


def test_registry_and_choices_agree():
    assert [m.name for m in contract.SHIFT_MODES.values()] == list(contract.SHIFT_MODE_NAMES)
    assert contract.shift_mode_named("norm").version == 2 and contract.shift_mode_named("add").version == 1
    assert contract.SHIFT_VERSIONS == (1, 2) and contract.SHIFT_VERSION == 1
    with pytest.raises(ValueError, match="unknown shift mode 'scale'"):
        contract.shift_mode_named("scale")
    config = SteerConfig.single_layer(1, np.ones(4, np.float32), 0.0, {2: np.ones(4, np.float32)})
    assert config.shift_mode == contract.DEFAULT_SHIFT_MODE == "add" and config.shift_version == 1
    config.shift_mode = "scale"
    with pytest.raises(ValueError, match="unknown shift mode"):
        config.check(4, 4)


def _manifest(**extra):
    return {"format_version": 2, "num_layers": 4, "hidden_size": 8, "steer_layers": [2, 3], "gate_layer": 1,
            "alpha": 1.0, "bias": 0.0, **extra}


def test_manifest_records_the_mode_and_refuses_an_unknown_one():
    assert Manifest.from_json(_manifest(shift_mode="norm"), "m").shift_mode == "norm"
    assert Manifest.from_json(_manifest(), "m").shift_mode == "add"  # every export before issue 17
    with pytest.raises(AlignerError, match="shift_mode.*must be one of add, norm"):
        check_manifest(_manifest(shift_mode="scale"), "m")
    with pytest.raises(AlignerError, match="shift_mode"):
        check_manifest(_manifest(shift_mode=2), "m")
    assert Key.SHIFT_MODE in contract.KEY_FACTS and Key.SHIFT_MODE not in contract.REQUIRED_V2


# --- tiny real exports in mode "norm" -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def norm_pack(tiny_model_dir, tmp_path_factory):
    from export_packs import make_pack

    model_dir = tiny_model_dir("llama")
    return model_dir, make_pack(model_dir, tmp_path_factory.mktemp("norm") / "pack.safetensors", gate_layer=2,
                                steer_layers=(1, 2, 3))


def _export(model_dir, pack, out, *extra):
    from aligner_export.commands.cli import main

    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "-o", str(out), "--no-validate",
                 *extra]) == 0
    return json.loads((out / "inferaligner.json").read_text())


@pytest.mark.parametrize("impl", ["function", "inline"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_norm_export_against_reference(norm_pack, tmp_path, impl, padding_side):
    """Layers 1-3 steered in mode norm, the gate at 2 (layer 1 below it: two-pass prefill); a batch with mixed gates,
    prefill and 3 decode steps, both paddings, both impls: ORT against the PyTorch hooks."""
    from aligner_export.hf.modeling import load_model
    from aligner_export.hf.validate import validate
    from aligner_export.pack import load_pack

    model_dir, pack = norm_pack
    manifest = _export(model_dir, pack, tmp_path / "out", "--shift-mode", "norm", "--steer-impl", impl)
    assert manifest[Key.SHIFT_MODE] == "norm"
    spec = load_pack(pack).config_of_export(manifest)
    assert spec.shift_mode == "norm"
    model, tokenizer = load_model(model_dir)
    result = validate(tmp_path / "out" / "model.onnx", model, tokenizer, spec, padding_side=padding_side)
    assert result.prefill_max_abs_diff <= 1e-4 and result.decode_max_abs_diff <= 1e-4
    assert sorted(result.gates) == [0.0, 1.0] or [r["forced"] for r in result.rounds][-1] == [1.0, 0.0]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["inferaligner.shift_mode"]) == "norm"
    if impl == "function":
        assert {o.domain: o.version for o in graph.opset_import}[onnx_ops.DOMAIN] == 2
        shifts = [n for n in graph.graph.node if n.op_type == "SteerShift"]
        assert len(shifts) == 3 and all(onnx_ops.node_attr(n, "plugin_version") == "2" for n in shifts)
        assert any(n.op_type == "Sqrt" for f in graph.functions if f.name == "SteerShift" for n in f.node)
    # The add-mode reference differs from this export: the mode reached the graph.
    from dataclasses import replace

    add = validate(tmp_path / "out" / "model.onnx", model, tokenizer, replace(spec, shift_mode="add"),
                   padding_side=padding_side, tolerance=1e9)
    assert max(add.prefill_max_abs_diff, add.decode_max_abs_diff) > 1e-3


def test_norm_export_fp16_against_reference(norm_pack, tmp_path):
    import torch

    from aligner_export.hf.modeling import load_model
    from aligner_export.hf.validate import validate
    from aligner_export.pack import load_pack

    model_dir, pack = norm_pack
    manifest = _export(model_dir, pack, tmp_path / "out", "--shift-mode", "norm", "--dtype", "fp16")
    assert manifest["dtype"] == "fp16" and manifest[Key.SHIFT_MODE] == "norm"
    model, tokenizer = load_model(model_dir)
    spec = load_pack(pack).config_of_export(manifest)
    result = validate(tmp_path / "out" / "model.onnx", model.to(torch.float16), tokenizer, spec, dtype="fp16")
    assert result.prefill_max_abs_diff <= result.tolerance and result.decode_max_abs_diff <= result.tolerance


def test_gate_zero_rows_equal_the_unsteered_export(norm_pack, tmp_path):
    """steer_gate_in [0, 1] in one batch: row 0 is bit for bit the plain optimum export's, row 1 is steered."""
    from aligner_export.hf.base_export import base_export
    from aligner_export.hf.families import family_for
    from aligner_export.hf.modeling import load_model
    from aligner_export.ort import OrtLM, ort_session
    from aligner_runtime.contract import position_ids

    model_dir, pack = norm_pack
    _export(model_dir, pack, tmp_path / "out", "--shift-mode", "norm")
    model, _ = load_model(model_dir)
    plain_path, _ = base_export(model, tmp_path / "plain", family_for(model.config))
    steered = OrtLM(ort_session(tmp_path / "out" / "model.onnx", "disable"))
    plain = ort_session(plain_path, "disable")
    ids = np.random.default_rng(2).integers(3, 300, size=(2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), **steered.empty_past(2)}
    want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
    got = steered.step(ids, mask, position_ids(mask), steered.empty_past(2), np.array([0.0, 1.0], np.float32))
    assert got["logits"][0].tobytes() == want["logits"][0].tobytes()
    assert got["present.3.value"][0].tobytes() == want["present.3.value"][0].tobytes()
    assert np.abs(got["logits"][1] - want["logits"][1]).max() > 1e-3


def test_default_and_old_packs_shift_add(norm_pack, tmp_path):
    """A pack that records no shift_mode (every pack before issue 17) exports mode add; --shift-mode overrides a
    pack's recommendation; a pack recommending an unknown mode is refused."""
    from aligner_export.pack import load_pack, save_pack

    model_dir, pack_path = norm_pack
    pack = load_pack(pack_path)
    assert "shift_mode" not in pack.recommended and pack.shift_mode == "add"
    manifest = _export(model_dir, pack_path, tmp_path / "add")
    assert manifest[Key.SHIFT_MODE] == "add"
    # an older export's manifest, without the key, gives the add-mode configuration
    del manifest[Key.SHIFT_MODE]
    assert pack.config_of_export(manifest).shift_mode == "add"
    assert Manifest.from_json(manifest, "old").shift_mode == "add"
    pack.meta["recommended"]["shift_mode"] = "norm"
    norm_path = save_pack(pack, tmp_path / "norm.safetensors")
    assert load_pack(norm_path).shift_mode == "norm"
    assert _export(model_dir, norm_path, tmp_path / "norm")[Key.SHIFT_MODE] == "norm"
    assert _export(model_dir, norm_path, tmp_path / "override", "--shift-mode", "add")[Key.SHIFT_MODE] == "add"
    pack.meta["recommended"]["shift_mode"] = "scale"
    with pytest.raises(AlignerError, match="shift_mode.*must be one of add, norm"):
        save_pack(pack, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("impl", ["function", "inline"])
def test_inspect_shows_the_mode_and_a_contradiction(norm_pack, tmp_path, capsys, impl):
    from aligner_export.commands.cli import main

    model_dir, pack = norm_pack
    out = tmp_path / "out"
    _export(model_dir, pack, out, "--shift-mode", "norm", "--steer-impl", impl)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shift (graph): norm (SteerShift v2" in text
    if impl == "function":
        assert "SteerShift/2" in text
    assert "says shift mode" not in text
    # a claim of another mode than the graph's nodes is reported
    assert main(["inspect", str(out / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["graph"]["shift_modes"] == {"1": "norm", "2": "norm", "3": "norm"}  # JSON object keys
    assert info["metadata_matches_graph"]
    from aligner_export.commands.inspect import disagreements

    claims = dict(info["metadata"], shift_mode="add")
    graph = dict(info["graph"], shift_modes={1: "norm", 2: "norm", 3: "norm"})
    assert any("says shift mode add" in line for line in disagreements(claims, graph, "manifest"))
    del claims["shift_mode"]  # an export from before issue 17 claims add
    assert any("says shift mode add" in line for line in disagreements(claims, graph, "manifest"))


@pytest.mark.parametrize("variant", ["function", "inline"])
def test_runtime_greedy_equals_reference_in_norm_mode(tmp_path_factory, tiny_model_dir, variant):
    """aligner_runtime on a calibrated tiny export in mode norm (the linear gate, layers 0-3 steered): greedy tokens,
    gates and scores of a batch with mixed gates equal the PyTorch reference's."""
    from aligner_runtime.api import Aligner
    from runtime_exports import LINEAR_OPTIONS, steer_config, tiny_export
    from test_runtime_export import NEW_TOKENS, _reference, mixed_prompts

    options = LINEAR_OPTIONS + (("--shift-mode", "norm"),) + ((("--steer-impl", "inline"),) if variant == "inline"
                                                               else ())
    export_dir, model_dir, pack = tiny_export(tmp_path_factory, tiny_model_dir, "llama", options)
    aligner = Aligner.load(export_dir)
    assert aligner.manifest[Key.SHIFT_MODE] == "norm"
    prompts = mixed_prompts(aligner)
    results = aligner.generate(prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))
    spec = steer_config(export_dir, pack)
    assert spec.shift_mode == "norm"
    _, _, expected, gates, scores = _reference(model_dir, spec, prompts, NEW_TOKENS)
    for prompt, result, tokens, gate, score in zip(prompts, results, expected, gates, scores):
        assert result.gate == gate
        assert result.score == pytest.approx(score, abs=1e-4)
        assert result.token_ids == tokens, prompt
