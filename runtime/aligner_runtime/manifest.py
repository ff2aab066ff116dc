"""Loading and checking an export directory (ARCHITECTURE.md §6).

An export dir holds ``model.onnx`` (+ external data), the tokenizer files, the chat template,
``generation_config.json`` and the manifest ``inferaligner.json``. The same key facts sit in the graph's
``metadata_props`` under ``inferaligner.*``. :func:`load_export` refuses (fails closed) when

- the manifest is missing or unreadable, or lacks a required field;
- the manifest and the graph's metadata disagree on a key fact (a tampered or mixed-up directory);
- the graph has no steering nodes, or its steering nodes sit on other layers than the manifest says;
- the graph lacks the steering interface (``steer_gate_in`` → ``steer_gate``, ``steer_score``),

unless the caller passes ``allow_unsteered=True``, in which case the model is loaded and marked unsteered.

The graph is read with a small protobuf walker instead of the ``onnx`` package, which the run-time does not depend
on (§2); it skips the weights by length, so a large inline model costs one pass over its headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

from .contract import (DOMAIN, GATE_IN, GATE_OUT, MANIFEST_FILE, METADATA_PREFIX, MODEL_FILE, SCORE_OUT,
                       STEER_GATE, STEER_SHIFT, parse_node_name, two_pass_prefill)
from .errors import AlignerError

SUPPORTED_FORMAT_VERSIONS = (1, 2)

# Facts that must agree between the manifest and the graph's metadata_props whenever both hold them.
KEY_FACTS = ("format_version", "pack_sha256", "target_fingerprint", "steer_layers", "gate_layer", "alpha", "bias",
             "bias_rule", "steer_impl", "dtype", "site", "chat_template_sha256", "num_layers", "hidden_size",
             "multimodal", "gate", "two_pass_prefill", "steering_io")
# Without these the runtime cannot know where the graph steers: their absence counts as "unsteered".
STEERING_FACTS = ("steer_layers", "gate_layer", "alpha", "bias")



# --- a minimal ONNX protobuf reader -------------------------------------------------------------------------------
# Field numbers from onnx.proto3: ModelProto.graph = 7, .metadata_props = 14; GraphProto.node = 1, .input = 11,
# .output = 12; NodeProto.name = 3, .op_type = 4, .domain = 7; ValueInfoProto.name = 1; StringStringEntry 1, 2.

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yields ``(field_number, wire_type, value)``; length-delimited values are ``(offset, end)`` pairs."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _string(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


@dataclass
class GraphSummary:
    """What the run-time needs to know about ``model.onnx`` without loading it."""

    metadata: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # (name, op_type, domain) of the main graph's nodes that belong to a steering operator.
    steer_nodes: list[tuple[str, str, str]] = field(default_factory=list)

    def steer_layers(self, op_type: str) -> set[int]:
        return {parsed[0] for name, _, _ in self.steer_nodes
                if (parsed := parse_node_name(name)) is not None and parsed[1] == op_type}


def read_graph_summary(path: str | Path) -> GraphSummary:
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _summarise(buf)
    except (OSError, ValueError, IndexError) as exc:
        raise AlignerError(f"cannot read the ONNX graph {path}: {exc}") from None


def _summarise(buf) -> GraphSummary:
    summary = GraphSummary()
    graph_span = None
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            graph_span = value
        elif number == 14 and wire == 2:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if n == 1 and w == 2:
                    key = _string(buf, v)
                elif n == 2 and w == 2:
                    val = _string(buf, v)
            summary.metadata[key] = val
    if graph_span is None:
        raise ValueError("no graph in the model")
    for number, wire, value in _fields(buf, *graph_span):
        if wire != 2:
            continue
        if number in (11, 12):
            name = next((_string(buf, v) for n, w, v in _fields(buf, *value) if n == 1 and w == 2), "")
            (summary.inputs if number == 11 else summary.outputs).append(name)
        elif number == 1:
            name = op_type = domain = ""
            for n, w, v in _fields(buf, *value):
                if w != 2:
                    continue
                if n == 3:
                    name = _string(buf, v)
                elif n == 4:
                    op_type = _string(buf, v)
                elif n == 7:
                    domain = _string(buf, v)
            if parse_node_name(name) is not None or domain == DOMAIN:
                summary.steer_nodes.append((name, op_type, domain))
    return summary


# --- the export directory -----------------------------------------------------------------------------------------

@dataclass
class ExportDir:
    """A checked export directory. ``steered`` is False only when the caller allowed an unsteered model."""

    path: Path
    manifest: dict
    manifest_sha256: str
    graph: GraphSummary
    steered: bool
    unsteered_reason: str | None = None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def gate_layer(self) -> int | None:
        """g*: the last gate layer, where the decision is taken."""
        return self.manifest.get("gate_layer")

    @property
    def gate_layers(self) -> list[int]:
        """G: every layer a SteerGate node reads."""
        return manifest_gate_layers(self.manifest)

    @property
    def steer_layers(self) -> list[int]:
        return list(self.manifest.get("steer_layers") or [])

    @property
    def two_pass(self) -> bool:
        """§5 rule 2 (``contract.two_pass_prefill``), as the manifest records it."""
        if not self.steered or self.gate_layer is None:
            return False
        recorded = self.manifest.get("two_pass_prefill")
        return bool(recorded) if isinstance(recorded, bool) else two_pass_prefill(self.steer_layers, self.gate_layers)


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _metadata_value(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def manifest_sha256(path: str | Path) -> str:
    return hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()


def read_manifest(path: Path) -> tuple[dict, str]:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise AlignerError(f"not an export directory (no {MANIFEST_FILE}): {path}")
    try:
        raw = file.read_bytes()
        manifest = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignerError(f"cannot read the manifest {file}: {exc}") from None
    if not isinstance(manifest, dict):
        raise AlignerError(f"manifest {file} is not a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise AlignerError(f"manifest {file} has format_version {version!r}; this runtime reads "
                           f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}")
    return manifest, hashlib.sha256(raw).hexdigest()


def manifest_gate_layers(manifest: dict) -> list[int]:
    """G from a manifest: format 2's ``gate.layers``; format 1 has the one ``gate_layer``."""
    gate = manifest.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("layers"), list):
        return [int(l) for l in gate["layers"]]
    return [int(manifest["gate_layer"])] if manifest.get("gate_layer") is not None else []


def _steering_problem(manifest: dict, graph: GraphSummary) -> str | None:
    """Why this graph cannot be trusted to steer as its manifest says, or None."""
    missing = [k for k in STEERING_FACTS if k not in manifest]
    if missing:
        return f"the manifest has no steering configuration ({', '.join(missing)} missing)"
    if GATE_IN not in graph.inputs or any(o not in graph.outputs for o in (GATE_OUT, SCORE_OUT)):
        return f"the graph lacks the steering interface ({GATE_IN} -> {GATE_OUT}, {SCORE_OUT})"
    if not graph.steer_nodes:
        return "the graph has no steering nodes"
    gate_layers = graph.steer_layers(STEER_GATE)
    shift_layers = graph.steer_layers(STEER_SHIFT)
    expected = set(manifest_gate_layers(manifest))
    if gate_layers != expected:
        return (f"the graph's SteerGate nodes sit on layers {sorted(gate_layers)} but the manifest says gate layers "
                f"{sorted(expected)}")
    if shift_layers != set(manifest["steer_layers"]):
        return (f"the graph's SteerShift nodes sit on layers {sorted(shift_layers)} but the manifest says "
                f"steer_layers {sorted(manifest['steer_layers'])}")
    return None


def load_export(path: str | Path, allow_unsteered: bool = False) -> ExportDir:
    """Reads and checks an export directory; see the module docstring for what is refused."""
    path = Path(path)
    if not path.exists():
        raise AlignerError(f"export directory not found: {path}")
    if not path.is_dir():
        raise AlignerError(f"not an export directory: {path}")
    manifest, digest = read_manifest(path)
    model = path / MODEL_FILE
    if not model.is_file():
        raise AlignerError(f"export directory has no {MODEL_FILE}: {path}")
    graph = read_graph_summary(model)

    # A disagreement between the manifest and the graph's own record is refused even with allow_unsteered:
    # it means the directory was edited or mixed up, and nothing in it can be trusted.
    for key in KEY_FACTS:
        meta_key = METADATA_PREFIX + key
        if key in manifest and meta_key in graph.metadata:
            if not _same(manifest[key], _metadata_value(graph.metadata[meta_key])):
                raise AlignerError(f"manifest and graph disagree on {key}: {manifest[key]!r} in {MANIFEST_FILE}, "
                                   f"{graph.metadata[meta_key]!r} in {MODEL_FILE} (tampered or mixed-up export)")
    io = manifest.get("io") or {}
    for kind, names in (("inputs", graph.inputs), ("outputs", graph.outputs)):
        listed = io.get(kind)
        if listed is not None and list(listed) != list(names):
            raise AlignerError(f"manifest and graph disagree on the graph {kind} (tampered or mixed-up export)")

    from .multimodal import MultimodalSpec

    multimodal = MultimodalSpec.from_manifest(manifest)
    if multimodal is not None:
        multimodal.check_files(path)
        if "inputs_embeds" not in graph.inputs:
            raise AlignerError(f"manifest and graph disagree: the manifest describes a vision-language export but "
                               f"{MODEL_FILE} does not take inputs_embeds (tampered or mixed-up export)")
    problem = _steering_problem(manifest, graph)
    if problem is None and not any(k.startswith(METADATA_PREFIX) for k in graph.metadata):
        problem = f"the graph carries no {METADATA_PREFIX}* metadata"
    if problem is not None and not allow_unsteered:
        raise AlignerError(f"refusing {path}: {problem}; pass allow_unsteered=True only to run it without "
                           f"safety steering")
    return ExportDir(path=path, manifest=manifest, manifest_sha256=digest, graph=graph, steered=problem is None,
                     unsteered_reason=problem)
