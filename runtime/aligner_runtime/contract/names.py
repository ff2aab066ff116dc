"""Names of the contract (docs/contract.md): the operators, the graph's steering and base-model I/O, the files of an
export directory and the steering nodes. The C++ copy is ``plugins/common/steerContract.h``; ``tests/
test_contract_sync.py`` keeps the two in step."""

from __future__ import annotations

import re

# --- operators (docs/contract.md "Operators") ------------------------------------------------------------------------
DOMAIN = "inferaligner"
PLUGIN_NAMESPACE = "inferaligner"
STEER_GATE = "SteerGate"
STEER_SHIFT = "SteerShift"
OP_TYPES = (STEER_GATE, STEER_SHIFT)
SHIFT_VERSION = 1  # SteerShift's first version ("add"); version 2 is "norm" (contract.steering.SHIFT_MODES)
# Attributes every steering node carries for TensorRT's plugin lookup; they are not constants of the operator.
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")


def plugin_version(op_type: str, gate_version: int = 1, shift_version: int = SHIFT_VERSION) -> str:
    """The ``plugin_version`` attribute of a node of ``op_type``: its operator version (SteerGate's is its gate
    version, SteerShift's its shift mode's)."""
    return str(gate_version if op_type == STEER_GATE else shift_version)


# --- graph interface (§5) ---------------------------------------------------------------------------------------------
GATE_IN = "steer_gate_in"
GATE_OUT = "steer_gate"
SCORE_OUT = "steer_score"
# The manifest's ``steering_io``: the C runtime reads the names from there.
STEERING_IO = {"gate_in": GATE_IN, "gate": GATE_OUT, "score": SCORE_OUT}
GATE_DECIDE = -1.0  # steer_gate_in that lets SteerGate decide from the score (§5 runtime protocol, step 1)

# --- files (§6) -------------------------------------------------------------------------------------------------------
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "inferaligner.json"
STAMP_FILE = "ENGINE.json"  # beside a TensorRT engine
VISION_FILE = "vision.onnx"  # vision-language exports (docs/multimodal.md)
EMBED_FILE = "embed.onnx"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
METADATA_PREFIX = "inferaligner."
SITE = "decoder_layer_output"  # §3

# --- base-model graph I/O (the names HF/optimum exports use; docs/contract.md "Graph interface") -----------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
INPUTS_EMBEDS = "inputs_embeds"  # vision-language exports feed embeddings instead of token ids
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
PAST_KINDS = ("key", "value")
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.{layer}.{kind}``: the graph input that carries layer ``layer``'s cached keys or values."""
    if kind not in PAST_KINDS:
        raise ValueError(f"not a cache kind: {kind!r}")
    return f"{PAST_PREFIX}{int(layer)}.{kind}"


def present_name(past: str) -> str:
    """The graph output that returns the updated cache of the past input ``past``."""
    match = PAST.match(past)
    if match is None:
        raise ValueError(f"not a past-key-values input name: {past!r}")
    layer, kind = match.groups()
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def is_past(name: str) -> bool:
    return PAST.match(name or "") is not None


# --- node names -------------------------------------------------------------------------------------------------------
_NODE_NAME = re.compile(r"^/model/layers\.(\d+)/steer/(SteerGate|SteerShift)(?:/|$)")
STEER_PREFIX = "/model/steer/"  # helper nodes shared by the layers (the clamped gate_in, the zero score)


def node_name(layer: int, op_type: str) -> str:
    """``/model/layers.{l}/steer/{op}``: the name of the steering node of ``op_type`` at ``layer``."""
    if op_type not in OP_TYPES:
        raise ValueError(f"not a steering op: {op_type}")
    return f"/model/layers.{int(layer)}/steer/{op_type}"


def parse_node_name(name: str) -> tuple[int, str] | None:
    """``(layer, op_type)`` of a steering node name (or of a node inlined from one), else None."""
    match = _NODE_NAME.match(name or "")
    return (int(match.group(1)), match.group(2)) if match else None


def layer_prefix(layer: int) -> str:
    """Every node that belongs to layer ``layer``'s steering starts with this (inline bodies included)."""
    return f"/model/layers.{int(layer)}/steer/"


