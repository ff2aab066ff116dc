"""The steering configuration (docs/contract.md): the registry of gate kinds and shift modes, the gate baked into a
graph and the vectors added at each steered layer. Numpy only: the modules that own each kind's ONNX form, PyTorch
reference and plugin register those under the kind's name (the import arrows keep pointing at this package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .choices import BIAS_RULES, DEFAULT_SHIFT_MODE, SHIFT_MODE_NAMES
from .protocol import two_pass_prefill

# --- the registry of gate kinds and shift modes ----------------------------------------------------------------------
SHIFT_CONSTANT = "vector"  # SteerShift's one constant attribute, α_l·θ_l, in every mode


@dataclass(frozen=True)
class GateKind:
    """One kind of gate: the SteerGate operator version that computes it and the contract facts of its configuration.

    A new kind (a token-pooled gate, an MLP head) is one :func:`register_gate_kind` call here plus its operator,
    registered by the module that owns each form under this kind's ``name``: the ONNX function and node builder
    (``aligner_export.graph.onnx_ops.register_gate_op``), the PyTorch reference term
    (``aligner_export.hf.reference.register_gate_term``), the C++/CUDA plugin of ``version``. What the rest of the
    package needs to know of a kind is here:

    - ``constants``: the node attributes that carry its constants (what the integrity digests hash, what the
      self-test reads, the ONNX function's attributes besides the plugin's);
    - ``rules``: the threshold rules a gate of this kind may record (the manifest's ``gate.rule``), and
      ``default_rule``;
    - ``pack_name``: how a steering pack and ``--gate`` name it (``None``: a pack cannot select it);
      ``pack_weights``: a pack stores its fitted weights (the ``gate.weight`` tensor and the ``gate`` metadata, whose
      ``version`` the pack check takes from here), rather than deriving it from the per-layer statistics;
      ``max_weights``: its gate has a second weight per gate layer, ``GateConfig.max_weights`` (the constant
      ``max_weight``, the pack's ``gate.max_weight`` tensor);
    - ``chained``: its nodes take ``score_in`` (one node per gate layer, the scores summed along the chain);
    - the shape rules :meth:`check` applies (``max_layers``, ``fixed_tokens``, ``normalizes``)."""

    name: str
    version: int
    pack_name: str | None
    constants: tuple[str, ...]
    rules: tuple[str, ...]
    summary: str
    pack_weights: bool = False
    chained: bool = False
    default_rule: str | None = None  # a GateConfig's rule when none is given; None: the first of ``rules``
    max_layers: int | None = None  # None: any number of gate layers
    fixed_tokens: int | None = None  # None: K is configurable
    normalizes: bool = True  # may pool normalised residuals
    max_weights: bool = False  # a second weight per gate layer for the max over the prompt (GateConfig.max_weights)

    def check(self, gate: "GateConfig") -> None:
        if self.max_layers is not None and len(gate.layers) > self.max_layers:
            raise ValueError(f"a {self.name} gate (version {self.version}) reads at most {self.max_layers} layer(s), "
                             f"got {len(gate.layers)}")
        if self.fixed_tokens is not None and gate.tokens != self.fixed_tokens:
            raise ValueError(f"a {self.name} gate (version {self.version}) reads {self.fixed_tokens} token(s), "
                             f"got {gate.tokens}")
        if gate.normalize and not self.normalizes:
            raise ValueError(f"a {self.name} gate (version {self.version}) has no normalisation")
        if gate.rule not in self.rules:
            raise ValueError(f"a {self.name} gate (version {self.version}) records the rule "
                             f"{' or '.join(self.rules)}, got {gate.rule!r}")


@dataclass(frozen=True)
class ShiftMode:
    """One kind of SteerShift: the operator version that implements it (docs/contract.md "Operators"); its ONNX body
    and PyTorch reference are registered under ``name`` by the modules that own them."""

    name: str
    version: int
    summary: str


GATE_KINDS: dict[int, GateKind] = {}
SHIFT_MODES: dict[int, ShiftMode] = {}


def register_gate_kind(kind: GateKind) -> GateKind:
    if kind.version in GATE_KINDS:
        raise ValueError(f"gate version {kind.version} is registered already ({GATE_KINDS[kind.version].name})")
    if any(k.name == kind.name or (kind.pack_name and k.pack_name == kind.pack_name) for k in GATE_KINDS.values()):
        raise ValueError(f"a gate kind named {kind.name!r} (pack name {kind.pack_name!r}) is registered already")
    if not kind.rules or (kind.default_rule is not None and kind.default_rule not in kind.rules):
        raise ValueError(f"gate kind {kind.name!r}: give its rules {list(kind.rules)}, the default rule one of them")
    GATE_KINDS[kind.version] = kind
    return kind


def register_shift_mode(mode: ShiftMode) -> ShiftMode:
    if mode.version in SHIFT_MODES:
        raise ValueError(f"shift version {mode.version} is registered already ({SHIFT_MODES[mode.version].name})")
    if mode.name not in SHIFT_MODE_NAMES:
        raise ValueError(f"shift mode {mode.name!r} is not one of contract.choices.SHIFT_MODE_NAMES "
                         f"{SHIFT_MODE_NAMES}: add it there too")
    SHIFT_MODES[mode.version] = mode
    return mode


# The paper's gate: one direction at one layer, the last prompt token, no normalisation; its bias is the pack's
# per-layer statistic under a bias rule.
register_gate_kind(GateKind("paper", 1, pack_name="paper", constants=("direction", "bias"), rules=BIAS_RULES,
                            summary="h[last] . direction + bias", default_rule="fpr", max_layers=1, fixed_tokens=1,
                            normalizes=False))
# §5.1's linear gate: weights over several layers, pooled over the last K prompt tokens, fitted by calibration.
register_gate_kind(GateKind("linear", 2, pack_name="linear", constants=("weight", "bias", "tokens", "normalize"),
                            rules=("linear",), summary="sum over G of mean_K n(h) . w_l + bias", pack_weights=True,
                            chained=True))
# Issue 18's pooled gate: version 2's linear term plus, per gate layer, the max over every valid prompt position of
# n(h) . m_l (a role-play rewrite that dilutes the last tokens no longer switches the gate off).
register_gate_kind(GateKind("pooled", 3, pack_name="pooled",
                            constants=("weight", "max_weight", "bias", "tokens", "normalize"), rules=("linear",),
                            summary="sum over G of (mean_K n(h) . w_l + max_P n(h) . m_l) + bias", pack_weights=True,
                            chained=True, max_weights=True))
# The names the CLIs (--gate) and the checks take follow the kinds registered above: how a steering pack names the
# kinds it can select, and every rule a gate may record.
PACK_GATES = tuple(k.pack_name for _, k in sorted(GATE_KINDS.items()) if k.pack_name)
GATE_RULES = tuple(dict.fromkeys(rule for _, k in sorted(GATE_KINDS.items()) for rule in k.rules))

# The paper's shift: h + gate·α_l·θ_l.
register_shift_mode(ShiftMode("add", 1, summary="h + gate·v"))
# Issue 17: the shifted state rescaled to its norm before the shift, ‖h‖·y/‖y‖ with y = h + gate·α_l·θ_l.
register_shift_mode(ShiftMode("norm", 2, summary="h + gate·v rescaled to ‖h‖"))


def gate_constants() -> tuple[str, ...]:
    """Every node attribute that carries a steering constant, of every registered gate kind and SteerShift."""
    names = {name for kind in GATE_KINDS.values() for name in kind.constants} | {SHIFT_CONSTANT}
    return tuple(sorted(names))


def gate_kind_of_constants(names) -> GateKind | None:
    """The registered kind whose SteerGate nodes carry exactly these constant attributes (an inlined graph's gate is
    recognised by them), or None."""
    given = set(names)
    for kind in GATE_KINDS.values():
        if set(kind.constants) == given:
            return kind
    return None


def pack_weight_versions() -> tuple[int, ...]:
    """The SteerGate versions a steering pack may store fitted weights for (its ``gate.version``)."""
    return tuple(sorted(v for v, kind in GATE_KINDS.items() if kind.pack_weights))


def shift_mode_named(name: str) -> ShiftMode:
    """The registered SteerShift mode ``name``; ValueError naming the modes when none is."""
    for mode in SHIFT_MODES.values():
        if mode.name == name:
            return mode
    raise ValueError(f"unknown shift mode {name!r}: use one of {', '.join(m.name for m in SHIFT_MODES.values())}")


def shift_mode_of_version(version: int) -> ShiftMode:
    """The registered mode of SteerShift ``version``; ValueError when none is."""
    try:
        return SHIFT_MODES[version]
    except (KeyError, TypeError):
        raise ValueError(f"shift version {version!r} is not one of {tuple(SHIFT_MODES)}") from None


def gate_kind(version: int) -> GateKind:
    """The registered kind of SteerGate ``version``; ValueError when none is."""
    try:
        return GATE_KINDS[version]
    except (KeyError, TypeError):
        raise ValueError(f"gate version {version!r} is not one of {tuple(GATE_KINDS)}") from None


def gate_kind_named(pack_name: str) -> GateKind:
    """The kind a steering pack names ``pack_name``."""
    for kind in GATE_KINDS.values():
        if kind.pack_name == pack_name:
            return kind
    raise ValueError(f"unknown gate kind {pack_name!r}: use one of "
                     f"{', '.join(k.pack_name for k in GATE_KINDS.values() if k.pack_name)}")



# --- the steering configuration -------------------------------------------------------------------------------------
class GateKey:
    """The keys of a gate's record: the manifest's ``gate`` object (:meth:`GateConfig.manifest`) and, for a kind with
    ``pack_weights``, the steering pack's ``gate`` metadata."""

    VERSION = "version"
    LAYERS = "layers"
    TOKENS = "tokens"
    NORMALIZE = "normalize"
    BIAS = "bias"
    RULE = "rule"


@dataclass
class GateConfig:
    """The gate baked into a graph (docs/contract.md).

    ``version`` 1: one layer, ``weights[layer]`` the unit direction, one token, no normalisation.
    ``version`` 2 (§5.1): ``score = Σ_{l∈layers} weights[l]·f_l + bias`` where ``f_l`` pools ``n(h_l)`` over the last
    ``tokens`` valid prompt positions and ``n`` is ``x/‖x‖`` when ``normalize``.
    ``version`` 3 (issue 18): version 2's score plus ``Σ_l max_{s∈P} n(h_l[s])·max_weights[l]`` over every valid
    prompt position of the call; ``max_weights`` is given for version 3 only.
    """

    layers: tuple[int, ...]
    weights: Mapping[int, np.ndarray]
    bias: float
    tokens: int = 1
    normalize: bool = False
    version: int = 1
    rule: str | None = None  # None: the kind's default rule
    max_weights: Mapping[int, np.ndarray] | None = None  # version 3: the weight of each layer's max term

    def __post_init__(self):
        if self.rule is None and self.version in GATE_KINDS:  # an unknown version is check()'s to refuse
            kind = GATE_KINDS[self.version]
            self.rule = kind.default_rule or kind.rules[0]
        self.layers = tuple(sorted(int(l) for l in self.layers))
        self.weights = {int(l): np.asarray(w, dtype=np.float32) for l, w in self.weights.items()}
        if self.max_weights is not None:
            self.max_weights = {int(l): np.asarray(w, dtype=np.float32) for l, w in self.max_weights.items()}
        self.bias = float(self.bias)

    @property
    def last_layer(self) -> int:
        """g*: where the decision is taken."""
        return self.layers[-1]

    @property
    def kind(self) -> GateKind:
        return gate_kind(self.version)

    def check(self, num_layers: int, hidden_size: int) -> "GateConfig":
        """Raises ValueError naming the first thing that is not a valid gate for this model."""
        kind = gate_kind(self.version)
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
        if kind.max_weights:
            if self.max_weights is None:
                raise ValueError(f"a {kind.name} gate (version {kind.version}) needs a max weight per gate layer")
            if set(self.max_weights) != set(self.layers):
                raise ValueError(f"gate max weights given for layers {sorted(self.max_weights)}, gate layers are "
                                 f"{list(self.layers)}")
            for layer, weight in self.max_weights.items():
                if weight.shape != (hidden_size,):
                    raise ValueError(f"gate max weight of layer {layer} has shape {list(weight.shape)}, expected "
                                     f"[{hidden_size}]")
                if not np.all(np.isfinite(weight)):
                    raise ValueError(f"gate max weight of layer {layer} holds NaN or inf")
        elif self.max_weights is not None:
            raise ValueError(f"a {kind.name} gate (version {kind.version}) has no max weights")
        if not np.isfinite(self.bias):
            raise ValueError(f"gate bias is not finite: {self.bias}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, (int, np.integer)) or self.tokens < 1:
            raise ValueError(f"gate tokens (K) must be an integer >= 1, got {self.tokens!r}")
        kind.check(self)
        return self

    def manifest(self) -> dict:
        """The manifest's ``gate`` object (weights are recorded by digest, not value)."""
        return {GateKey.VERSION: self.version, GateKey.LAYERS: list(self.layers), GateKey.TOKENS: int(self.tokens),
                GateKey.NORMALIZE: bool(self.normalize), GateKey.BIAS: self.bias, GateKey.RULE: self.rule}


@dataclass
class SteerConfig:
    """What steering does to one model: the gate, the vectors ``α_l·θ_l`` of each steered layer and how SteerShift
    applies them (``shift_mode``: "add", version 1, or "norm", version 2; one mode for every steered layer). The one
    configuration type of the package (calibration's recommendation, the PyTorch reference, the graph rewrite and the
    export validation all take it)."""

    gate: GateConfig
    vectors: Mapping[int, np.ndarray]
    steer_impl: str = "function"
    extra: dict = field(default_factory=dict)
    shift_mode: str = DEFAULT_SHIFT_MODE

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

    @property
    def shift_version(self) -> int:
        """The SteerShift operator version of ``shift_mode``."""
        return shift_mode_named(self.shift_mode).version

    def check(self, num_layers: int, hidden_size: int) -> "SteerConfig":
        self.gate.check(num_layers, hidden_size)
        shift_mode_named(self.shift_mode)
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
                     steer_impl: str = "function", rule: str = "fpr",
                     shift_mode: str = DEFAULT_SHIFT_MODE) -> "SteerConfig":
        """A version-1 gate (the paper's: one layer, one direction) with these vectors."""
        gate = GateConfig(layers=(gate_layer,), weights={gate_layer: direction}, bias=bias, rule=rule)
        return cls(gate=gate, vectors=vectors, steer_impl=steer_impl, shift_mode=shift_mode)
