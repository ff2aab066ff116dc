"""The real embedded SmolLM2-135M-Instruct: the export validates against PyTorch (integration)."""

from __future__ import annotations

import json

import pytest

from aligner_export.commands.cli import main
from export_packs import make_pack

pytestmark = pytest.mark.integration


def test_smollm2_export_validates(smollm2_dir, tmp_path, capsys):
    # Random unit vectors with a bias that splits the validation prompts: this checks the export's fidelity, not
    # the safety of the steering (calibration's tests do that).
    pack = make_pack(smollm2_dir, tmp_path / "pack.safetensors", gate_layer=12, steer_layers=range(10, 21))
    out = tmp_path / "out"
    assert main(["export", "--target", str(smollm2_dir), "--pack", str(pack), "-o", str(out)]) == 0
    manifest = json.loads((out / "inferaligner.json").read_text())
    validation = manifest["validation"]
    assert sorted(validation["gates"]) == [0.0, 1.0]
    assert max(validation["prefill_max_abs_diff"], validation["decode_max_abs_diff"]) <= validation["tolerance"]
    assert validation["tolerance"] <= 1e-3
    assert manifest["num_layers"] == 30 and manifest["hidden_size"] == 576
    assert manifest["steer_layers"] == list(range(10, 21)) and manifest["gate"]["layers"] == [12]
    assert (out / "chat_template.jinja").read_text().startswith("{%") or "im_start" in \
        (out / "chat_template.jinja").read_text()
    assert main(["inspect", str(out)]) == 0
    assert "steered: yes" in capsys.readouterr().out
