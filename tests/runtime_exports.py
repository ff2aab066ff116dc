"""Tiny real exports for the run-time tests: a tiny random model, calibrated (self mode, shipped prompt sets) and
exported with ``aligner-export``, built once per test session and set of options."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict = {}

PROMPTS = Path(__file__).resolve().parents[1] / "export" / "aligner_export" / "data" / "prompts"
# Layers 0-3 steered with the paper gate on layer 2: layer 0 and 1 lie below the gate, so the §5 two-pass rule applies.
# The reference comparisons built on these pin the shift alone (--no-end-rule); tests/test_end_rule.py checks the end
# rule on ONNX Runtime against the reference with END_RULE_OPTIONS.
DEFAULT_OPTIONS = (("--steer-layers", "0-3"), ("--gate-layer", "2"), ("--alpha", "4"), ("--bias-rule", "paper"),
                   ("--no-end-rule",))
# The pack's linear gate (§5.1, SteerGate version 2 chained over its layers), layers 0-3 steered.
LINEAR_OPTIONS = (("--steer-layers", "0-3"), ("--alpha", "4"), ("--gate", "linear"), ("--no-end-rule",))
# The linear gate with an end rule that bites within a few tokens of a tiny model's answer.
END_RULE_OPTIONS = (("--steer-layers", "0-3"), ("--alpha", "4"), ("--gate", "linear"), ("--end-after", "2"),
                    ("--end-slope", "3"))


def _cli(*args: str) -> None:
    from aligner_export.commands.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"aligner-export {' '.join(map(str, args))} exited {code}")


def tiny_export(tmp_path_factory, tiny_model_dir, family: str = "llama", options=DEFAULT_OPTIONS) -> tuple[Path, Path, Path]:
    """Returns ``(export_dir, model_dir, pack)``."""
    key = (family, tuple(options))
    if key not in _CACHE:
        import warnings

        model_dir = tiny_model_dir(family)
        root = tmp_path_factory.mktemp(f"export-{family}")
        pack = root / "pack.safetensors"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A random tiny model has no harm direction to find: a loose false-positive budget keeps the linear gate
            # firing on a good share of prompts, so that the tests have mixed gates in one batch.
            _cli("calibrate", "--target", model_dir, "-o", pack, "--harmful", PROMPTS / "harmful.txt",
                 "--harmless", PROMPTS / "harmless.txt", "--max-fpr", "0.2")
        out = root / "export"
        _cli("export", "--target", model_dir, "--pack", pack, "-o", out, *[x for pair in options for x in pair])
        _CACHE[key] = (out, model_dir, pack)
    return _CACHE[key]


def steer_config(export_dir: Path, pack_path: Path):
    """The reference's SteerConfig for an export, from its manifest and pack."""
    import json

    from aligner_export.pack import load_pack

    manifest = json.loads((export_dir / "inferaligner.json").read_text())
    return load_pack(pack_path).config_of_export(manifest)
