"""Integrity of everything in an export directory that decides the safety behaviour (issue 14, docs/contract.md
"Integrity digests").

The exporter records, in the manifest's ``integrity`` object:

- ``constants``: per steering node, the sha256 of its constants (the canonical form that the TensorRT plugin library
  computes from its fields too, so the C API checks an engine against the same values);
- ``functions``: the sha256 of each steering function body (function form);
- ``wiring``: the sha256 of how the steering nodes are connected to the rest of the graph;
- ``nodes``: the sha256 of the steering nodes' own bytes (every attribute, the helper constants and the Constants of an
  inlined body included);
- ``files``: the sha256 of the tokenizer files, the chat template and the generation config;
- ``model_files``: the sha256 of ``model.onnx``, its external data and the other graphs (checked unless the caller
  turns it off: it costs one read of the weights).

:func:`verify` recomputes each from the files with the torch- and onnx-free graph reader and refuses, naming what
changed, on any difference or on a missing entry. What this protects and what it cannot is in docs/integrity.md.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .contract import (DOMAIN, EMBED_FILE, MANIFEST_FILE, MODEL_FILE, OP_TYPES, PLUGIN_ATTRIBUTES, STEER_GATE,
                       STEER_SHIFT, VISION_FILE, gate_constants, node_name)
from .errors import AlignerError
from .onnx_graph import GraphSummary

# Names of the steering operators' constants (node attributes; in an inlined body, the outputs of its Constants): every
# registered gate kind's and SteerShift's (contract.steering).
CONSTANT_ATTRIBUTES = gate_constants()
# Files whose bytes decide what the model is asked (tokenizer, template) or when it stops; digested when present.
GUARDED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                 "config.json", "preprocessor_config.json", "processor_config.json")
_CHUNK = 1 << 22


def constants_digest(attributes: Mapping[str, tuple[str, np.ndarray]]) -> str:
    """sha256 over ``utf8(name) ‖ 0x00 ‖ tag ‖ uint64_le(count) ‖ values`` for each constant in ascending name order;
    tag ``f``: float32 little-endian values, ``i``: int64 little-endian values."""
    digest = hashlib.sha256()
    for name in sorted(attributes):
        tag, values = attributes[name]
        array = np.asarray(values, dtype="<f4" if tag == "f" else "<i8").reshape(-1)
        digest.update(name.encode("utf-8") + b"\0" + tag.encode("ascii") + struct.pack("<Q", array.size))
        digest.update(array.tobytes())
    return digest.hexdigest()


def steering_node_names(gate_layers: Iterable[int], steer_layers: Iterable[int]) -> list[str]:
    return [node_name(l, STEER_GATE) for l in sorted(gate_layers)] + \
        [node_name(l, STEER_SHIFT) for l in sorted(steer_layers)]


def node_constants(summary: GraphSummary, name: str) -> dict[str, tuple[str, np.ndarray]] | None:
    """The constants of steering node ``name``: its numeric attributes (function form), or the values of the
    ``Constant`` nodes of its inlined body that produce ``{name}/{attribute}`` (inline form). None if absent."""
    for node in summary.nodes:
        if node.name == name and node.domain == DOMAIN:
            return {a.name: (a.tag, a.values) for a in node.attributes.values()
                    if a.name not in PLUGIN_ATTRIBUTES and a.tag is not None}
    found = {}
    prefix = name + "/"
    for node in summary.nodes:
        if node.op_type != "Constant" or not node.name.startswith(prefix) or len(node.outputs) != 1:
            continue
        attribute = node.outputs[0][len(prefix):] if node.outputs[0].startswith(prefix) else None
        if attribute in CONSTANT_ATTRIBUTES:
            value = next((a for a in node.attributes.values() if a.tag is not None), None)
            if value is not None:
                found[attribute] = (value.tag, value.values)
    return found or None


def wiring_digest(summary: GraphSummary) -> str:
    """sha256 of the sorted lines ``name|domain|op_type|inputs|outputs`` of every steering node, then of every use of
    a steering output by another node (``consumer|input index|value``) or as a graph output."""
    steering = [n for n in summary.nodes if n.is_steering]
    produced = {o for n in steering for o in n.outputs if o}
    lines = sorted(f"{n.name}|{n.domain}|{n.op_type}|{','.join(n.inputs)}|{','.join(n.outputs)}" for n in steering)
    uses = sorted(f"{n.name or ','.join(n.outputs)}|{i}|{value}" for n in summary.nodes if not n.is_steering
                  for i, value in enumerate(n.inputs) if value in produced)
    uses += sorted(f"graph_output|{o}" for o in summary.outputs if o in produced)
    return hashlib.sha256("\n".join(lines + ["--"] + uses).encode("utf-8")).hexdigest()


def nodes_digest(summary: GraphSummary) -> str:
    """sha256 of the sorted lines ``name|sha256(NodeProto bytes)`` of every steering node: the values of every
    attribute, which the constants digest leaves out for the helper nodes ``/model/steer/*`` (the zero that clamps
    ``steer_gate_in``, the zero score the v2 chain starts from) and for the Constants of an inlined body other than the
    operator's own (the decision's threshold among them)."""
    lines = sorted(f"{n.name}|{n.digest}" for n in summary.nodes if n.is_steering)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def function_digests(summary: GraphSummary) -> dict[str, str]:
    return {name: digest for (domain, name), digest in summary.functions.items()
            if domain == DOMAIN and name in OP_TYPES}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_file_names(directory: Path) -> list[str]:
    """``model.onnx`` and the other graphs, with any external data files beside them (``<graph>_data`` or
    ``<graph>.data`` as the exporters name them)."""
    names = []
    for graph in (MODEL_FILE, VISION_FILE, EMBED_FILE):
        names += sorted(p.name for p in directory.iterdir()
                        if p.is_file() and (p.name == graph or p.name.startswith(graph + "_")
                                            or p.name.startswith(graph + ".")))
    return names


def compute(directory: Path, summary: GraphSummary, gate_layers, steer_layers, steer_impl: str) -> dict:
    """The manifest's ``integrity`` object for an export directory whose files are final."""
    directory = Path(directory)
    constants = {}
    for name in steering_node_names(gate_layers, steer_layers):
        values = node_constants(summary, name)
        if values is None:
            raise AlignerError(f"integrity: no constants found for the steering node {name}")
        constants[name] = constants_digest(values)
    functions = function_digests(summary)
    if steer_impl == "function" and set(functions) != set(OP_TYPES):
        raise AlignerError("integrity: the graph lacks a steering function body")
    return {
        "constants": constants,
        "functions": functions,
        "wiring": wiring_digest(summary),
        "nodes": nodes_digest(summary),
        "files": {name: file_sha256(directory / name) for name in GUARDED_FILES if (directory / name).is_file()},
        "model_files": {name: file_sha256(directory / name) for name in model_file_names(directory)},
    }


def verify(directory: Path, integrity: dict, summary: GraphSummary, gate_layers, steer_layers, steer_impl: str,
           verify_model_files: bool = True) -> None:
    """Refuses (one :class:`AlignerError` naming what changed) unless every digest of ``integrity`` matches the
    directory. ``integrity`` has been type-checked by the manifest loader."""
    expected = set(steering_node_names(gate_layers, steer_layers))
    if set(integrity["constants"]) != expected:
        raise AlignerError("the manifest's integrity digests name other steering nodes than its layers "
                           "(tampered manifest)")
    for name in sorted(expected):
        values = node_constants(summary, name)
        if values is None:
            raise AlignerError(f"the steering node {name} is missing from {MODEL_FILE} or has no constants "
                               f"(tampered graph)")
        if constants_digest(values) != integrity["constants"][name]:
            raise AlignerError(f"the constants of {name} differ from the ones exported (tampered graph)")
    functions = function_digests(summary)
    if steer_impl == "function":
        for op in OP_TYPES:
            if op not in functions:
                raise AlignerError(f"{MODEL_FILE} has no {op} function body (tampered graph)")
            if integrity["functions"].get(op) != functions[op]:
                raise AlignerError(f"the {op} function body differs from the one exported (tampered graph)")
    elif functions:
        raise AlignerError(f"{MODEL_FILE} holds steering function bodies but the export is inline (tampered graph)")
    if wiring_digest(summary) != integrity["wiring"]:
        raise AlignerError(f"the steering nodes of {MODEL_FILE} are wired differently from the export (tampered "
                           f"graph: a node replaced, rewired or its op changed)")
    if nodes_digest(summary) != integrity["nodes"]:
        raise AlignerError(f"an attribute of a steering node of {MODEL_FILE} differs from the export (tampered "
                           f"graph: a helper constant, an inlined constant or an attribute changed)")
    verify_files(directory, integrity, verify_model_files)


def verify_files(directory: Path, integrity: dict, verify_model_files: bool = True) -> None:
    """The tokenizer, template and config files, and (``verify_model_files``) the graphs and weights."""
    directory = Path(directory)
    for name, digest in sorted(integrity["files"].items()):
        _check_file(directory, name, digest)
    for name in GUARDED_FILES:
        if (directory / name).is_file() and name not in integrity["files"]:
            raise AlignerError(f"{name} was added to the export after it was made (tampered export)")
    if verify_model_files:
        listed = set(integrity["model_files"])
        extra = sorted(set(model_file_names(directory)) - listed)
        if extra:
            shown = extra[0] if extra[0].isprintable() else repr(extra[0])
            raise AlignerError(f"{shown} was added to the export after it was made (tampered export)")
        for name, digest in sorted(integrity["model_files"].items()):
            _check_file(directory, name, digest)


def _check_file(directory: Path, name: str, digest: str) -> None:
    if "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST_FILE) or not name.isprintable() \
            or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise AlignerError(f"the manifest's integrity lists an invalid file name {name[:80]!r} (tampered manifest)")
    path = directory / name
    try:
        if not path.is_file():
            raise AlignerError(f"{name} is missing from the export (it was there when the export was made)")
        actual = file_sha256(path)
    except (OSError, ValueError) as exc:  # unreadable, or a name the file system refuses (a lone surrogate)
        raise AlignerError(f"cannot read {name!r} of the export: {getattr(exc, 'strerror', None) or exc}") from None
    if actual != digest:
        raise AlignerError(f"{name} differs from the one exported (tampered or replaced file)")


def verify_plugin_constants(recorded: list[tuple[str, str, str, str]], integrity: dict) -> None:
    """The TensorRT path: ``recorded`` is the plugin library's digest registry after the engine was deserialised,
    ``(layer name, op, plugin version, digest)``; every steering node of the manifest must be there with its digest,
    and nothing else."""
    expected = integrity["constants"]
    seen = {}
    for name, _op, _version, digest in recorded:
        if name not in expected:
            raise AlignerError(f"the engine holds a steering plugin {name} that the export does not have (engine "
                               f"built from another export, or tampered)")
        seen[name] = digest
    for name, digest in sorted(expected.items()):
        if name not in seen:
            raise AlignerError(f"the engine lacks the steering plugin {name} (engine built from another export)")
        if seen[name] != digest:
            raise AlignerError(f"the constants of the engine's {name} differ from the export's (tampered engine)")
