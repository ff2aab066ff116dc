"""Steering packs with the pooled gate (SteerGate version 3, issue 18): the ``gate.max_weight`` tensor, pack format 3,
and what the loader refuses (docs/architecture.md §4, docs/contract.md "SteerGate version 3"). Packs are made here
with numpy, no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from aligner_export.pack import SteeringPack, load_pack, save_pack
from aligner_runtime.errors import AlignerError

pytest.importorskip("safetensors")

L, H = 4, 8


def _pack(version: int = 3, max_weight="random", recommended: str | None = None, rows: int = 2) -> SteeringPack:
    rng = np.random.default_rng(18)
    unit = rng.normal(size=(L, H)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    per_layer = [{"layer": l, "target_val_accuracy": 1.0, "aligned_val_accuracy": 1.0, "bias_paper": 0.1,
                  "bias_fpr": 0.05, "val_tpr": 1.0, "val_fpr": 0.0} for l in range(L)]
    layers = [1, 3][:rows]
    meta = {"mode": "self", "target": {"fingerprint": "0" * 64, "source": "x", "chat_template_sha256": ""},
            "aligned": {"fingerprint": "0" * 64, "source": "x", "chat_template_sha256": ""}, "prompts": {},
            "per_layer": per_layer,
            "recommended": {"gate_layer": 1, "steer_layers": [1, 2], "alpha": 4.0, "bias_rule": "paper",
                            "gate": recommended or {2: "linear", 3: "pooled"}[version]},
            "gate": {"version": version, "layers": layers, "tokens": 2, "normalize": True, "bias": -0.25,
                     "rule": "linear"}, "created_by": "tests"}
    weight = rng.normal(size=(len(layers), H)).astype(np.float32)
    if isinstance(max_weight, str):
        max_weight = rng.normal(size=(len(layers), H)).astype(np.float32)
    return SteeringPack(unit, unit, unit, unit, meta, weight, max_weight)


def test_pooled_pack_round_trip_in_format_3(tmp_path):
    pack = _pack()
    path = save_pack(pack, tmp_path / "p.safetensors")
    again = load_pack(path)
    assert again.meta["format_version"] == 3
    np.testing.assert_array_equal(again.gate_max_weight, pack.gate_max_weight)
    gate = again.gate("pooled")
    assert gate.version == 3 and gate.layers == (1, 3)
    np.testing.assert_array_equal(gate.max_weights[3], pack.gate_max_weight[1])
    np.testing.assert_array_equal(gate.weights[1], pack.gate_weight[0])
    assert again.tensors().keys() >= {"gate.weight", "gate.max_weight"}


def test_linear_pack_stays_format_2(tmp_path):
    """A pack without gate.max_weight is written in format 2, which older packages read."""
    again = load_pack(save_pack(_pack(version=2, max_weight=None), tmp_path / "p.safetensors"))
    assert again.meta["format_version"] == 2 and again.gate_max_weight is None
    assert again.gate("linear").version == 2 and again.gate("linear").max_weights is None


@pytest.mark.parametrize("change,needle", [
    (lambda p: setattr(p, "gate_max_weight", None), "needs gate.max_weight"),
    (lambda p: setattr(p, "gate_max_weight", p.gate_max_weight[:1]), "gate.max_weight must be float32 [2, 8]"),
    (lambda p: setattr(p, "gate_max_weight", p.gate_max_weight[:, :4].copy()), "gate.max_weight must be float32"),
    (lambda p: p.gate_max_weight.__setitem__((0, 0), np.nan), "gate.max_weight holds NaN"),
    (lambda p: setattr(p, "gate_max_weight", p.gate_max_weight.astype(np.float16)), "gate.max_weight must be"),
    (lambda p: p.meta["gate"].update(version=2), "has no gate.max_weight"),
    (lambda p: p.meta["recommended"].update(gate="linear"), "recommends the linear gate but holds a version-3"),
])
def test_bad_pooled_packs_are_refused_on_save(tmp_path, change, needle):
    pack = _pack()
    change(pack)
    with pytest.raises(AlignerError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        save_pack(pack, tmp_path / "p.safetensors")


def test_bad_pooled_packs_are_refused_on_load(tmp_path):
    """The loader refuses what save_pack would: written here with safetensors itself."""
    import json

    from safetensors.numpy import save_file

    pack = _pack()
    path = save_pack(pack, tmp_path / "good.safetensors")
    meta = dict(load_pack(path).meta)
    cases = {
        "a format-2 pack cannot hold a version-3 gate": ({**meta, "format_version": 2}, pack.tensors()),
        "needs gate.max_weight": (meta, {k: v for k, v in pack.tensors().items() if k != "gate.max_weight"}),
        "gate.max_weight without gate.weight": (meta, {k: v for k, v in pack.tensors().items()
                                                      if k != "gate.weight"}),
    }
    for needle, (bad_meta, tensors) in cases.items():
        bad = tmp_path / "bad.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(bad),
                  metadata={"inferaligner": json.dumps(bad_meta)})
        with pytest.raises(AlignerError, match=needle):
            load_pack(bad)


def test_gate_kind_must_match_the_fitted_gate(tmp_path):
    """--gate linear on a pooled pack (and --gate pooled on a linear one) is one clear refusal, not the other kind."""
    pooled = load_pack(save_pack(_pack(), tmp_path / "pooled.safetensors"))
    with pytest.raises(AlignerError, match="export it with --gate pooled"):
        pooled.gate("linear")
    linear = load_pack(save_pack(_pack(version=2, max_weight=None), tmp_path / "linear.safetensors"))
    with pytest.raises(AlignerError, match="export it with --gate linear"):
        linear.gate("pooled")
