"""The contract of ARCHITECTURE.md §5-§6 and docs/contract.md, defined once for the exporter and both runtimes.

Everything that more than one part of the package must agree on lives here: the operator domain, names and versions,
the graph's steering I/O names, the steering node names, the file names of an export directory and of an engine
stamp, the position-ids rule of a padded batch, the two-pass rule, and the one steering-configuration type
(:class:`SteerConfig`) that the calibration, the PyTorch reference, the graph rewrite and the validation all take.
The C++ side has its single copy of the names in ``plugins/common/steerContract.h`` and reads the graph I/O names and
the two-pass rule from the manifest (``steering_io``, ``two_pass_prefill``).

Numpy only: the runtime imports this on a device with no torch and no onnx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

# --- operators (docs/contract.md "Operators") ------------------------------------------------------------------------
DOMAIN = "inferaligner"
PLUGIN_NAMESPACE = "inferaligner"
STEER_GATE = "SteerGate"
STEER_SHIFT = "SteerShift"
OP_TYPES = (STEER_GATE, STEER_SHIFT)
GATE_VERSIONS = (1, 2)
SHIFT_VERSION = 1
# Attributes every steering node carries for TensorRT's plugin lookup; they are not constants of the operator.
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")


def plugin_version(op_type: str, gate_version: int = 1) -> str:
    """The ``plugin_version`` attribute of a node of ``op_type`` (SteerGate's is its gate version)."""
    return str(gate_version if op_type == STEER_GATE else SHIFT_VERSION)


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


# --- rules -----------------------------------------------------------------------------------------------------------
def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """HF's position ids for a padded batch: the count of real tokens so far minus one; padding positions get 1
    (they are masked, so any value would do, but every part of the package must feed the same graph the same ids)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)


def two_pass_prefill(steer_layers, gate_layers) -> bool:
    """§5 rule 2 (with §5.1's g* = max G): a second, steered prefill is needed when a steered layer lies below the
    last gate layer, because those layers shifted with ``max(gate_in, 0) = 0`` during the scoring pass."""
    gates = list(gate_layers)
    return bool(gates) and any(int(l) < max(gates) for l in steer_layers)


def prefill_decision(raw_gate, score, two_pass: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a runtime does after the scoring prefill (§5 rules 1 and 2, failing closed): returns each row's gate
    ``[B]`` float32 and the rows to prefill again with the gate imposed.

    A row whose score is not finite is steered (docs/contract.md). Rows that fired are prefilled again when the
    export needs it (``two_pass``), and so is every row the runtime forced: its scoring pass ran unsteered."""
    gate = np.asarray(raw_gate, dtype=np.float32).reshape(-1).copy()
    bad = ~np.isfinite(np.asarray(score, dtype=np.float32).reshape(-1))
    forced = bad & (gate <= 0.5)
    gate[bad] = 1.0
    fired = np.flatnonzero(gate > 0.5)
    return gate, fired if (two_pass or forced.any()) else fired[:0]


def shift_takes_decision(layer: int, gate_layers) -> bool:
    """SteerShift at ``layer`` takes SteerGate's decision when ``layer >= g*``, else ``max(gate_in, 0)`` (§5)."""
    return int(layer) >= max(gate_layers)


@dataclass(frozen=True)
class StrengthSchedule:
    """How strongly a steered row is shifted on each decode step (docs/contract.md "Strength schedule").

    The runtime feeds ``steer_gate_in = decision × strength(step)`` on decode step ``step`` (1 for the first token
    after the prompt; the prompt itself, step 0, gets the full strength 1). SteerShift adds ``gate · α_l·θ_l``, so the
    strength scales α: ``floor + (1 − floor) · 0.5^(step / half_life)``. ``half_life=None`` is the paper's constant
    shift. A harmless row's decision is 0 and stays 0 whatever the schedule."""

    half_life: float | None = None
    floor: float = 0.0

    def __post_init__(self):
        if self.half_life is not None and not (isinstance(self.half_life, (int, float)) and self.half_life > 0
                                               and self.half_life == self.half_life):
            raise ValueError(f"strength half_life must be a number > 0, got {self.half_life!r}")
        if not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor <= 1.0):
            raise ValueError(f"strength floor must be in [0, 1], got {self.floor!r}")

    def at(self, step: int) -> float:
        if self.half_life is None or step <= 0:
            return 1.0
        return float(self.floor + (1.0 - self.floor) * 0.5 ** (step / self.half_life))

    def manifest(self) -> dict | None:
        return None if self.half_life is None else {"half_life": float(self.half_life), "floor": float(self.floor)}

    @classmethod
    def from_manifest(cls, value) -> "StrengthSchedule":
        """From the manifest's ``strength`` (absent or null: constant); the manifest loader checked the kinds."""
        return cls() if not value else cls(half_life=value["half_life"], floor=value.get("floor", 0.0))


CONSTANT_STRENGTH = StrengthSchedule()


# --- the steering configuration -------------------------------------------------------------------------------------
GATE_RULES = ("paper", "fpr", "linear")


@dataclass
class GateConfig:
    """The gate baked into a graph (docs/contract.md).

    ``version`` 1: one layer, ``weights[layer]`` the unit direction, one token, no normalisation.
    ``version`` 2 (§5.1): ``score = Σ_{l∈layers} weights[l]·f_l + bias`` where ``f_l`` pools ``n(h_l)`` over the last
    ``tokens`` valid prompt positions and ``n`` is ``x/‖x‖`` when ``normalize``.
    """

    layers: tuple[int, ...]
    weights: Mapping[int, np.ndarray]
    bias: float
    tokens: int = 1
    normalize: bool = False
    version: int = 1
    rule: str = "fpr"

    def __post_init__(self):
        self.layers = tuple(sorted(int(l) for l in self.layers))
        self.weights = {int(l): np.asarray(w, dtype=np.float32) for l, w in self.weights.items()}
        self.bias = float(self.bias)

    @property
    def last_layer(self) -> int:
        """g*: where the decision is taken."""
        return self.layers[-1]

    def check(self, num_layers: int, hidden_size: int) -> "GateConfig":
        """Raises ValueError naming the first thing that is not a valid gate for this model."""
        if self.version not in GATE_VERSIONS:
            raise ValueError(f"gate version {self.version!r} is not one of {GATE_VERSIONS}")
        if not self.layers:
            raise ValueError("the gate has no layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"gate layers repeat: {list(self.layers)}")
        for layer in self.layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"gate layer {layer} out of range; the model has layers 0-{num_layers - 1}")
        if set(self.weights) != set(self.layers):
            raise ValueError(f"gate weights given for layers {sorted(self.weights)}, gate layers are "
                             f"{list(self.layers)}")
        for layer, weight in self.weights.items():
            if weight.shape != (hidden_size,):
                raise ValueError(f"gate weight of layer {layer} has shape {list(weight.shape)}, expected "
                                 f"[{hidden_size}]")
            if not np.all(np.isfinite(weight)):
                raise ValueError(f"gate weight of layer {layer} holds NaN or inf")
        if not np.isfinite(self.bias):
            raise ValueError(f"gate bias is not finite: {self.bias}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, (int, np.integer)) or self.tokens < 1:
            raise ValueError(f"gate tokens (K) must be an integer >= 1, got {self.tokens!r}")
        if self.version == 1 and (len(self.layers) != 1 or self.tokens != 1 or self.normalize):
            raise ValueError("a version-1 gate reads one layer at one token with no normalisation")
        return self

    def manifest(self) -> dict:
        """The manifest's ``gate`` object (weights are recorded by digest, not value)."""
        return {"version": self.version, "layers": list(self.layers), "tokens": int(self.tokens),
                "normalize": bool(self.normalize), "bias": self.bias, "rule": self.rule}


@dataclass
class SteerConfig:
    """What steering does to one model: the gate, and the vectors ``α_l·θ_l`` added at each steered layer. The one
    configuration type of the package (calibration's recommendation, the PyTorch reference, the graph rewrite and the
    export validation all take it)."""

    gate: GateConfig
    vectors: Mapping[int, np.ndarray]
    steer_impl: str = "function"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = {int(l): np.asarray(v, dtype=np.float32) for l, v in self.vectors.items()}

    @property
    def steer_layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def gate_layer(self) -> int:
        return self.gate.last_layer

    @property
    def two_pass(self) -> bool:
        return two_pass_prefill(self.steer_layers, self.gate.layers)

    def check(self, num_layers: int, hidden_size: int) -> "SteerConfig":
        self.gate.check(num_layers, hidden_size)
        if not self.vectors:
            raise ValueError("the steered set is empty")
        for layer, vector in self.vectors.items():
            if not 0 <= layer < num_layers:
                raise ValueError(f"steered layer {layer} out of range; the model has layers 0-{num_layers - 1}")
            if vector.shape != (hidden_size,) or not np.all(np.isfinite(vector)):
                raise ValueError(f"steering vector of layer {layer} must be a finite float32 [{hidden_size}]")
        return self

    @classmethod
    def single_layer(cls, gate_layer: int, direction, bias: float, vectors: Mapping[int, np.ndarray],
                     steer_impl: str = "function", rule: str = "fpr") -> "SteerConfig":
        """A version-1 gate (the paper's: one layer, one direction) with these vectors."""
        gate = GateConfig(layers=(gate_layer,), weights={gate_layer: direction}, bias=bias, rule=rule)
        return cls(gate=gate, vectors=vectors, steer_impl=steer_impl)
