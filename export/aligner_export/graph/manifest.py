"""The export manifest ``inferaligner.json`` and the graph's ``inferaligner.*`` metadata_props
(docs/architecture.md §6).

The run-time (``aligner_runtime.manifest.load_export``) compares the key facts of both and refuses a directory whose
manifest and graph disagree, so both are written from the same dict here. Metadata values are JSON text.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from aligner_runtime.errors import atomic_path
# KEY_FACTS and METADATA_EXTRA are the facts metadata_props holds; steering_record writes the steering part of a
# format-3 manifest (each gate fact once, in "gate") from the SteerConfig, for hf/export.py.
from aligner_runtime.contract import (KEY_FACTS, MANIFEST_FILE, METADATA_EXTRA, METADATA_PREFIX,  # noqa: F401
                                      steering_record)


def metadata_entries(manifest: dict) -> dict[str, str]:
    keys = [k for k in (*KEY_FACTS, *METADATA_EXTRA) if k in manifest]
    return {METADATA_PREFIX + k: json.dumps(manifest[k], sort_keys=True) for k in keys}


def set_metadata(model: onnx.ModelProto, manifest: dict) -> None:
    entries = metadata_entries(manifest)
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def write_metadata(model_path: Path, manifest: dict) -> None:
    """Rewrites only the graph file's metadata; external weight files stay as they are."""
    model = onnx.load(str(model_path), load_external_data=False)
    set_metadata(model, manifest)
    with atomic_path(model_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_FILE
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_metadata(model: onnx.ModelProto) -> dict:
    """The ``inferaligner.*`` facts of a graph as a dict (values decoded from JSON)."""
    facts = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            try:
                facts[prop.key[len(METADATA_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                facts[prop.key[len(METADATA_PREFIX):]] = prop.value
    return facts
