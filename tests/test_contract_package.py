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
    assert contract.GATE_VERSIONS == (1, 2)


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
    with pytest.raises(ValueError, match="registered already"):
        register_gate_kind(GateKind("again", 2, pack_name=None))
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
