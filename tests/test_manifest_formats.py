"""Every manifest format keeps loading (issue 19): format 1 (no integrity digests, with ``allow_legacy``), format 2
(the gate's last layer, bias and rule recorded twice: at the top level and in ``gate``) and format 3 (once, in
``gate``). The fixtures are seeded exports of both gate kinds (tests/fuzz/harness.py), checked by the same loader the
runtime uses; the typed views agree on the gate whatever the format."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest

from aligner_runtime.contract import GATE_DUPLICATES, Manifest
from aligner_runtime.errors import AlignerError
from aligner_runtime.manifest import load_export

from fuzz import harness

KINDS = [(version, fmt) for version in (1, 2) for fmt in (2, 3)]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {(v, f): harness.seed_export(root / f"gate{v}-format{f}", "function", v, f) for v, f in KINDS}


@pytest.mark.parametrize("gate_version,fmt", KINDS)
def test_formats_2_and_3_load_and_agree(seeded, gate_version, fmt):
    export = load_export(seeded[(gate_version, fmt)])
    assert export.steered and export.manifest["format_version"] == fmt
    assert export.gate_layers == list(harness._gate_layers(gate_version))
    assert export.gate_layer == export.gate_layers[-1]
    facts = Manifest.from_json(export.manifest, "test")
    assert facts.gate_layer == export.gate_layer and facts.bias == pytest.approx(0.25)
    assert facts.gate_version == gate_version and facts.gate_rule == ("paper" if gate_version == 1 else "linear")
    assert (set(GATE_DUPLICATES) <= set(export.manifest)) == (fmt == 2)


@pytest.mark.parametrize("gate_version", [1, 2])
def test_format3_with_a_top_level_copy_is_refused(seeded, tmp_path, gate_version):
    """A format-3 manifest that records a gate fact twice is refused, even when both records agree."""
    source = seeded[(gate_version, 3)]
    for key in GATE_DUPLICATES:
        path = tmp_path / key
        path.mkdir()
        for item in source.iterdir():
            (path / item.name).write_bytes(item.read_bytes())
        manifest = json.loads((path / "inferaligner.json").read_text())
        gate = manifest["gate"]
        manifest[key] = {"gate_layer": gate["layers"][-1], "bias": gate["bias"], "bias_rule": gate["rule"]}[key]
        (path / "inferaligner.json").write_text(json.dumps(manifest))
        with pytest.raises(AlignerError, match=f"must not hold '{key}'"):
            load_export(path)


def test_format1_loads_with_allow_legacy(seeded, tmp_path):
    """A format-1 export (what versions before 0.2 wrote: no digests, no gate object) loads only with allow_legacy,
    and its gate is the top-level gate_layer."""
    source = seeded[(1, 2)]
    for item in source.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((tmp_path / "inferaligner.json").read_text())
    for key in ("integrity", "steering_io", "two_pass_prefill", "gate"):
        manifest.pop(key)
    manifest["format_version"] = 1
    (tmp_path / "inferaligner.json").write_text(json.dumps(manifest))
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    kept = [(p.key, "1" if p.key == "inferaligner.format_version" else p.value) for p in model.metadata_props
            if p.key not in ("inferaligner.steering_io", "inferaligner.two_pass_prefill", "inferaligner.gate")]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(AlignerError, match="format 1"):
        load_export(tmp_path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        export = load_export(tmp_path, allow_legacy=True)
    assert export.steered and export.gate_layers == [2] and export.gate_layer == 2
    facts = Manifest.from_json(export.manifest, "test")
    assert facts.legacy and facts.gate_version == 1 and facts.bias == pytest.approx(0.25)
    assert facts.gate_rule == "paper"
