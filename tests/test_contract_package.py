"""The contract package: the old ``contract`` names still resolve, the gate-kind registry enforces each kind's shape
rules, and the typed manifest reads what check_manifest accepts."""

from __future__ import annotations

import numpy as np
import pytest

from aligner_runtime import contract
from aligner_runtime.contract import (GateConfig, GateKind, Key, Manifest, gate_kind, gate_kind_named,
                                      register_gate_kind)
from aligner_runtime.errors import AlignerError

# Every public name the single-module contract.py had (before issue 19).
OLD_NAMES = ("DOMAIN", "PLUGIN_NAMESPACE", "STEER_GATE", "STEER_SHIFT", "OP_TYPES", "GATE_VERSIONS", "SHIFT_VERSION",
             "PLUGIN_ATTRIBUTES", "plugin_version", "GATE_IN", "GATE_OUT", "SCORE_OUT", "STEERING_IO", "GATE_DECIDE",
             "MODEL_FILE", "MANIFEST_FILE", "STAMP_FILE", "VISION_FILE", "EMBED_FILE", "CHAT_TEMPLATE_FILE",
             "METADATA_PREFIX", "SITE", "STEER_PREFIX", "node_name", "parse_node_name", "layer_prefix", "position_ids",
             "two_pass_prefill", "prefill_decision", "shift_takes_decision", "StrengthSchedule", "CONSTANT_STRENGTH",
             "GATE_RULES", "GateConfig", "SteerConfig")


def test_old_names_resolve():
    missing = [name for name in OLD_NAMES if not hasattr(contract, name)]
    assert not missing
    assert contract.GATE_VERSIONS == (1, 2, 3)


def test_past_and_present_names():
    assert contract.past_name(3, "value") == "past_key_values.3.value"
    assert contract.present_name("past_key_values.11.key") == "present.11.key"
    assert contract.is_past("past_key_values.0.key") and not contract.is_past("present.0.key")
    with pytest.raises(ValueError):
        contract.present_name("logits")


def _gate(version, layers, tokens=1, normalize=False):
    return GateConfig(layers=layers, weights={l: np.ones(4, np.float32) for l in layers}, bias=0.5, tokens=tokens,
                      normalize=normalize, version=version)


def test_registry_enforces_the_kind_rules():
    assert gate_kind(1).name == "paper" and gate_kind_named("linear").version == 2
    _gate(2, (1, 2), tokens=3, normalize=True).check(num_layers=4, hidden_size=4)
    for bad in (_gate(1, (1, 2)), _gate(1, (1,), tokens=2), _gate(1, (1,), normalize=True), _gate(7, (1,))):
        with pytest.raises(ValueError):
            bad.check(num_layers=4, hidden_size=4)
    # Version 3 (issue 18): a max weight per gate layer, required, [H], finite; no other kind takes one.
    pooled = GateConfig(layers=(1, 2), weights={l: np.ones(4, np.float32) for l in (1, 2)}, bias=0.5, tokens=2,
                        normalize=True, version=3, max_weights={l: np.ones(4, np.float32) for l in (1, 2)})
    assert gate_kind_named("pooled").version == 3 and pooled.check(num_layers=4, hidden_size=4) is pooled
    for max_weights, why in ((None, "needs a max weight"), ({1: np.ones(4)}, "max weights given for layers"),
                             ({1: np.ones(4), 2: np.ones(3)}, "shape"), ({1: np.ones(4), 2: np.full(4, np.nan)},
                                                                         "NaN or inf")):
        with pytest.raises(ValueError, match=why):
            GateConfig(layers=(1, 2), weights=pooled.weights, bias=0.5, tokens=2, version=3,
                       max_weights=max_weights).check(num_layers=4, hidden_size=4)
    with pytest.raises(ValueError, match="has no max weights"):
        GateConfig(layers=(1, 2), weights=pooled.weights, bias=0.5, tokens=2, version=2,
                   max_weights=pooled.max_weights).check(num_layers=4, hidden_size=4)
    assert contract.gate_kind_of_constants(("weight", "max_weight", "bias", "tokens", "normalize")).version == 3
    assert contract.gate_kind_of_constants(("weight", "bias", "tokens", "normalize")).version == 2
    with pytest.raises(ValueError, match="registered already"):
        register_gate_kind(GateKind("again", 2, pack_name=None, constants=("bias",), rules=("linear",), summary=""))
    with pytest.raises(ValueError, match="unknown gate kind"):
        gate_kind_named("mlp")


def test_typed_manifest():
    raw = {Key.FORMAT_VERSION: 2, Key.NUM_LAYERS: 4, Key.STEER_LAYERS: [1, 3], Key.GATE_LAYER: 2, Key.ALPHA: 4.0,
           Key.BIAS: 0.1, Key.GATE: {"version": 2, "layers": [1, 2], "tokens": 2, "normalize": True, "bias": 0.1},
           Key.STRENGTH: {"half_life": 8.0, "floor": 0.25}}
    manifest = Manifest.from_json(raw, "test")
    assert manifest.gate_layers == (1, 2) and manifest.steer_layers == (1, 3)
    assert manifest.two_pass is True  # steered layer 1 lies below the last gate layer 2
    assert manifest.strength.at(8) == pytest.approx(0.25 + 0.75 * 0.5)
    assert manifest.steering_declared and not manifest.legacy and Key.INTEGRITY in manifest.missing_required()
    assert manifest.to_json() == raw
    with pytest.raises(AlignerError, match="gate_layer"):
        Manifest.from_json({**raw, Key.GATE_LAYER: 1}, "test")


# --- manifest format 3: each gate fact once (issue 19) ------------------------------------------------------------------
def _format3(**extra):
    return {Key.FORMAT_VERSION: 3, Key.NUM_LAYERS: 4, Key.STEER_LAYERS: [1, 3], Key.ALPHA: 4.0,
            Key.GATE: {"version": 2, "layers": [1, 2], "tokens": 2, "normalize": True, "bias": 0.1,
                       "rule": "linear"}, **extra}


def test_format3_records_the_gate_once():
    manifest = Manifest.from_json(_format3(), "test")
    assert manifest.gate_layer == 2 and manifest.bias == pytest.approx(0.1) and manifest.gate_rule == "linear"
    assert manifest.gate_version == 2 and manifest.steering_declared
    assert Key.GATE_LAYER not in manifest.missing_required() and Key.BIAS not in manifest.missing_required()
    assert Key.INTEGRITY in manifest.missing_required()
    for key, value in ((Key.GATE_LAYER, 2), (Key.BIAS, 0.1), (Key.BIAS_RULE, "fpr")):
        with pytest.raises(AlignerError, match=f"must not hold '{key}'"):
            Manifest.from_json(_format3(**{key: value}), "test")


def test_format3_gate_rule_is_required_and_belongs_to_the_kind():
    raw = _format3()
    del raw[Key.GATE]["rule"]
    with pytest.raises(AlignerError, match="'rule' is missing"):
        Manifest.from_json(raw, "test")
    raw[Key.GATE]["rule"] = "paper"  # a linear gate's bias is fitted, never the paper rule
    with pytest.raises(AlignerError, match="'rule' must be one of linear"):
        Manifest.from_json(raw, "test")
    paper = {**_format3(), Key.GATE: {"version": 1, "layers": [2], "tokens": 1, "normalize": False, "bias": -0.3,
                                      "rule": "paper"}}
    assert Manifest.from_json(paper, "test").gate_rule == "paper"


def test_format2_copies_must_agree_with_the_gate_object():
    """Formats 1 and 2 keep loading; their top-level copies are cross-checked against ``gate``."""
    raw = {Key.FORMAT_VERSION: 2, Key.NUM_LAYERS: 4, Key.STEER_LAYERS: [3], Key.GATE_LAYER: 2, Key.ALPHA: 4.0,
           Key.BIAS: -0.3, Key.BIAS_RULE: "fpr",
           Key.GATE: {"version": 1, "layers": [2], "tokens": 1, "normalize": False, "bias": -0.3}}
    manifest = Manifest.from_json(raw, "test")
    # a format-2 manifest written before gate.rule existed: the rule is the top-level bias_rule
    assert manifest.gate_layer == 2 and manifest.bias == pytest.approx(-0.3) and manifest.gate_rule == "fpr"
    with pytest.raises(AlignerError, match="'bias' must be the gate's bias"):
        Manifest.from_json({**raw, Key.BIAS: 0.5}, "test")
    legacy = Manifest.from_json({Key.FORMAT_VERSION: 1, Key.STEER_LAYERS: [3], Key.GATE_LAYER: 2, Key.ALPHA: 4.0,
                                 Key.BIAS: -0.3, Key.BIAS_RULE: "paper"}, "test")
    assert legacy.legacy and legacy.gate_layers == (2,) and legacy.gate_version == 1 and legacy.gate_rule == "paper"
    assert legacy.bias == pytest.approx(-0.3)


def test_steering_record_writes_format3():
    gate = GateConfig(layers=(1, 2), weights={1: np.ones(4), 2: np.ones(4)}, bias=0.25, tokens=2, version=2,
                      rule="linear")
    config = contract.SteerConfig(gate=gate, vectors={3: np.ones(4, np.float32)})
    record = contract.steering_record(config, 2.5)
    assert record[Key.FORMAT_VERSION] == contract.FORMAT_VERSION == 3
    assert not set(contract.GATE_DUPLICATES) & set(record)
    assert record[Key.GATE] == {"version": 2, "layers": [1, 2], "tokens": 2, "normalize": False, "bias": 0.25,
                                "rule": "linear"}
    assert Manifest.from_json({**record, Key.NUM_LAYERS: 4}, "test").gate_layer == 2


def test_gate_kind_hooks_come_from_the_registry():
    assert contract.gate_kind_of_constants(("bias", "direction")).name == "paper"
    assert contract.gate_kind_of_constants(("weight", "bias", "tokens", "normalize")).version == 2
    assert contract.gate_kind_of_constants(("weight",)) is None
    assert contract.pack_weight_versions() == (2, 3)
    assert set(contract.gate_constants()) == {"bias", "direction", "max_weight", "normalize", "tokens", "vector",
                                              "weight"}
    assert GateConfig(layers=(1,), weights={1: np.ones(4)}, bias=0.0).rule == "fpr"  # the paper kind's default
    assert contract.PACK_GATES == ("paper", "linear", "pooled") and contract.GATE_RULES == ("paper", "fpr", "linear")
    with pytest.raises(ValueError, match="registered already"):
        register_gate_kind(GateKind("mlp", 9, pack_name="linear", constants=("w1",), rules=("linear",), summary=""))
    with pytest.raises(ValueError, match="default rule"):
        register_gate_kind(GateKind("mlp", 9, pack_name="mlp", constants=("w1",), rules=(), summary=""))
    assert 9 not in contract.GATE_KINDS
