"""The steering pack: one safetensors file (docs/architecture.md §4, docs/contract.md).

Format 2 adds a linear gate (§5.1) beside format 1's per-layer statistics: the tensor ``gate.weight``
``[len(G), H]`` (one row per gate layer, in the order of ``gate.layers``) and the metadata object ``gate``
(``version`` 2, ``layers``, ``tokens``, ``normalize``, ``bias`` and how it was fitted). Format 3 (issue 18) adds the
tensor ``gate.max_weight`` ``[len(G), H]`` beside ``gate.weight``, present exactly when the gate is version 3 (the
pooled gate's max term); a pack is written in the lowest format that holds what it stores, so a pack without it stays
format 2 and readable by older packages. Format-1 and format-2 packs keep loading.
The loader checks the type and range of every field it uses before using it (issue 14).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligner_runtime import schema
from aligner_runtime.contract import (GATE_KINDS as GATE_KIND_REGISTRY, SITE, EndRule, GateConfig, GateKey, Manifest,
                                      SteerConfig, gate_kind, gate_kind_named, pack_weight_versions)
from aligner_runtime.contract.pack import LayerStatsKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError, atomic_path
from aligner_runtime.contract import PACK_GATES
from aligner_runtime.contract.choices import (ALPHA_PROFILES, BIAS_RULES, DEFAULT_SHIFT_MODE, PACK_MODES,
                                             SHIFT_MODE_NAMES, SSV_MODES)

FORMAT_VERSION = 3  # the newest format; save_pack writes the lowest one that holds the pack (pack_format)
READABLE_VERSIONS = (1, 2, 3)
MAX_WEIGHT_FORMAT = 3  # the first format that may hold gate.max_weight
TOKEN = "last_prompt_token"
# The pack's mode, bias rules and gate kinds are the contract's (aligner_runtime.contract.choices).
MODES, GATE_KINDS = PACK_MODES, PACK_GATES
TENSORS = ("target.srv", "target.mean_harmful", "target.mean_harmless", "aligned.srv")
GATE_WEIGHT = "gate.weight"
GATE_MAX_WEIGHT = "gate.max_weight"
GATE_TENSORS = (GATE_WEIGHT, GATE_MAX_WEIGHT)
MAX_LAYERS, MAX_HIDDEN, MAX_TOKENS = 4096, 1 << 20, 64
MAX_METADATA_BYTES = 16 << 20
MAX_TENSOR_ELEMENTS = 1 << 26  # per tensor; a 126-layer model of hidden size 16384 needs 2M


@dataclass
class SteeringPack:
    target_srv: np.ndarray
    target_mean_harmful: np.ndarray
    target_mean_harmless: np.ndarray
    aligned_srv: np.ndarray
    meta: dict = field(default_factory=dict)
    gate_weight: np.ndarray | None = None  # [len(G), H] for a pack with a fitted gate (version 2 or 3)
    gate_max_weight: np.ndarray | None = None  # [len(G), H] for a pack with a pooled gate (version 3)

    @property
    def num_layers(self) -> int:
        return int(self.target_srv.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.target_srv.shape[1])

    @property
    def recommended(self) -> dict:
        return self.meta[PackKey.RECOMMENDED]

    @property
    def mode(self) -> str:
        return self.meta[PackKey.MODE]

    @property
    def has_linear_gate(self) -> bool:
        return self.gate_weight is not None

    def layer_stats(self, layer: int) -> dict:
        return self.meta[PackKey.PER_LAYER][layer]

    def bias(self, layer: int, rule: str) -> float:
        if rule not in BIAS_RULES:
            raise AlignerError(f"unknown bias rule '{rule}': use one of {', '.join(BIAS_RULES)}")
        return float(self.layer_stats(layer)[LayerStatsKey.bias(rule)])

    def fitted_gate(self) -> GateConfig:
        """The gate calibration fitted and the pack stores (``gate.weight`` and the ``gate`` metadata; today the
        §5.1 linear gate of a pack calibrated with ``--gate linear``), checked against the pack's model."""
        if self.gate_weight is None:
            raise AlignerError("this steering pack has no linear gate (it was calibrated with --gate paper or by an "
                               "older version); export it with --gate paper, or calibrate again")
        gate = self.meta[PackKey.GATE]
        kind = gate_kind(gate[GateKey.VERSION])
        max_weights = None if self.gate_max_weight is None else dict(zip(gate[GateKey.LAYERS],
                                                                          self.gate_max_weight))
        config = GateConfig(layers=tuple(gate[GateKey.LAYERS]),
                            weights=dict(zip(gate[GateKey.LAYERS], self.gate_weight)), bias=gate[GateKey.BIAS],
                            tokens=gate[GateKey.TOKENS], normalize=gate[GateKey.NORMALIZE], version=kind.version,
                            rule=gate.get(GateKey.RULE, kind.rules[0]), max_weights=max_weights)
        return self._checked(config)

    def paper_gate(self, gate_layer: int, bias_rule: str) -> GateConfig:
        """The paper's gate: the target's SRV at ``gate_layer`` with the pack's bias under ``bias_rule``."""
        if not 0 <= int(gate_layer) < self.num_layers:
            raise AlignerError(f"gate layer {gate_layer} out of range; the model has layers 0-{self.num_layers - 1}")
        config = GateConfig(layers=(int(gate_layer),), weights={int(gate_layer): self.target_srv[int(gate_layer)]},
                            bias=self.bias(int(gate_layer), bias_rule), rule=bias_rule,
                            version=gate_kind_named("paper").version)
        return self._checked(config)

    def gate(self, pack_name: str, gate_layer: int | None = None, bias_rule: str | None = None) -> GateConfig:
        """The gate of kind ``pack_name`` (``--gate``): the fitted one the pack stores, or one derived from the
        per-layer statistics (the paper's, at ``gate_layer`` with ``bias_rule``)."""
        kind = gate_kind_named(pack_name)
        if kind.pack_weights:
            fitted = self.fitted_gate()
            if fitted.version != kind.version:
                raise AlignerError(f"this steering pack's fitted gate is the {fitted.kind.pack_name} gate (version "
                                   f"{fitted.version}), not the {kind.pack_name} gate: export it with --gate "
                                   f"{fitted.kind.pack_name}, or calibrate again with --gate {kind.pack_name}")
            return fitted
        return self.paper_gate(gate_layer, bias_rule)

    def _checked(self, gate: GateConfig) -> GateConfig:
        try:
            return gate.check(self.num_layers, self.hidden_size)
        except ValueError as exc:
            raise AlignerError(f"the pack's gate: {exc}") from None

    @property
    def shift_mode(self) -> str:
        """The recommended SteerShift mode ("add" for packs made before issue 17, which record none)."""
        return self.recommended.get(RecommendedKey.SHIFT_MODE, DEFAULT_SHIFT_MODE)

    @property
    def alpha_profile(self) -> str:
        """The recommended strength per layer ("flat" for packs made before issue 17, which record none)."""
        return self.recommended.get(RecommendedKey.ALPHA_PROFILE, "flat")

    def alphas(self, steer_layers, alpha: float, profile: str = "flat") -> dict[int, float]:
        """α_l of each steered layer (docs/calibration.md "Per-layer strengths"): ``flat``, every layer ``alpha``;
        ``norm``, ``alpha · ‖h_l‖ / mean_block ‖h‖`` with ``‖h_l‖`` the calibration's mean residual norm at layer l
        (the pack's ``per_layer``), so that the block's accumulated shift stays that of ``alpha`` on every layer."""
        layers = [int(l) for l in steer_layers]
        if profile == "flat":
            return {l: float(alpha) for l in layers}
        if profile != "norm":
            raise AlignerError(f"unknown alpha profile {profile!r} (choose from {', '.join(ALPHA_PROFILES)})")
        norms = [self.layer_stats(l).get(LayerStatsKey.RESIDUAL_NORM) for l in layers]
        if any(n is None for n in norms):
            raise AlignerError("this pack records no residual norms per layer (made before issue 17): "
                               "--alpha-profile norm needs a pack from a newer 'aligner-export calibrate'")
        mean = float(np.mean(norms))
        if not mean > 0:
            raise AlignerError("the pack's residual norms over the steered block are all zero: no norm profile")
        return {l: float(alpha) * float(n) / mean for l, n in zip(layers, norms)}

    def steer_config(self, steer_layers, alpha: float, gate: GateConfig, steer_impl: str = "function",
                     shift_mode: str | None = None, alphas: dict[int, float] | None = None) -> SteerConfig:
        """``gate`` and the vectors ``α_l * theta_l`` of the steered layers (``alphas``, default ``alpha`` on every
        layer), shifted in ``shift_mode`` (default: the pack's recommendation); checked
        (:meth:`SteerConfig.check`) against the pack's model."""
        bad = [l for l in steer_layers if not 0 <= int(l) < self.num_layers]
        if bad:
            raise AlignerError(f"steered layer {bad[0]} out of range; the model has layers 0-{self.num_layers - 1}")
        alphas = {int(l): float(alpha) for l in steer_layers} if alphas is None else alphas
        vectors = {int(l): np.float32(alphas[int(l)]) * self.aligned_srv[int(l)] for l in steer_layers}
        config = SteerConfig(gate=gate, vectors=vectors, steer_impl=steer_impl,
                             shift_mode=self.shift_mode if shift_mode is None else shift_mode)
        try:
            return config.check(self.num_layers, self.hidden_size)
        except ValueError as exc:
            raise AlignerError(f"steering configuration: {exc}") from None

    def config_of_export(self, manifest) -> SteerConfig:
        """The steering configuration an export of this pack was made with, from its manifest (a
        :class:`~aligner_runtime.contract.Manifest`, or the JSON object, checked here): what the PyTorch reference
        needs to reproduce that export. Every manifest format: the gate's layer and rule come from ``gate`` in
        format 3, from the top-level copies in formats 1 and 2."""
        if not isinstance(manifest, Manifest):
            manifest = Manifest.from_json(manifest, "the manifest")
        kind = gate_kind(manifest.gate_version)
        if kind.pack_weights:
            gate = self.fitted_gate()
        else:
            gate = self.paper_gate(manifest.gate_layer, manifest.gate_rule)
        return self.steer_config(manifest.steer_layers, manifest.alpha, gate,
                                 steer_impl=manifest.steer_impl or "function", shift_mode=manifest.shift_mode,
                                 alphas=manifest.alphas())

    def tensors(self) -> dict[str, np.ndarray]:
        tensors = {"target.srv": self.target_srv, "target.mean_harmful": self.target_mean_harmful,
                   "target.mean_harmless": self.target_mean_harmless, "aligned.srv": self.aligned_srv}
        if self.gate_weight is not None:
            tensors[GATE_WEIGHT] = self.gate_weight
        if self.gate_max_weight is not None:
            tensors[GATE_MAX_WEIGHT] = self.gate_max_weight
        return tensors

    @property
    def pack_format(self) -> int:
        """The format :func:`save_pack` writes: 3 for a pack with ``gate.max_weight``, else 2."""
        return MAX_WEIGHT_FORMAT if self.gate_max_weight is not None else 2


def _check_arrays(tensors: dict[str, np.ndarray], where: str) -> tuple[int, int]:
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise AlignerError(f"{where}: not a steering pack (missing tensors {', '.join(missing)})")
    shape = tensors["target.srv"].shape
    if len(shape) != 2 or not (1 <= shape[0] <= MAX_LAYERS and 1 <= shape[1] <= MAX_HIDDEN):
        raise AlignerError(f"{where}: target.srv must be [layers, hidden], got {list(shape)}")
    if GATE_MAX_WEIGHT in tensors and GATE_WEIGHT not in tensors:
        raise AlignerError(f"{where}: {GATE_MAX_WEIGHT} without {GATE_WEIGHT}")
    for name in (*TENSORS, *GATE_TENSORS):
        if name not in tensors:
            continue
        arr = tensors[name]
        want = shape if name not in GATE_TENSORS else (tensors[GATE_WEIGHT].shape[0], shape[1])
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape != want:
            raise AlignerError(f"{where}: {name} must be float32 {list(want)}, got {arr.dtype} {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise AlignerError(f"{where}: {name} holds NaN or inf values")
    return int(shape[0]), int(shape[1])


def _check_layers(values, num_layers: int, where: str, key: str) -> list[int]:
    if not values:
        raise AlignerError(f"{where}: '{key}' is empty")
    if len(set(values)) != len(values):
        raise AlignerError(f"{where}: '{key}' repeats a layer")
    bad = [v for v in values if not 0 <= v < num_layers]
    if bad:
        raise AlignerError(f"{where}: '{key}' has layer {bad[0]} out of range 0-{num_layers - 1}")
    return values


def check_meta(meta, layers: int, hidden: int, gate_rows: int | None, where: str, max_weight: bool = False) -> dict:
    """Checks the kind and range of every metadata field the package uses; returns ``meta``. ``max_weight``: the
    pack holds the ``gate.max_weight`` tensor (of ``gate_rows`` rows, :func:`_check_arrays` checked)."""
    if not isinstance(meta, dict):
        raise AlignerError(f"{where}: the 'inferaligner' metadata is not a JSON object")
    version = schema.field(meta, PackKey.FORMAT_VERSION, "int", where)
    if version not in READABLE_VERSIONS:
        raise AlignerError(f"{where}: unknown pack format version {version} (this package reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))})")
    if (schema.field(meta, PackKey.NUM_LAYERS, "int", where), schema.field(meta, PackKey.HIDDEN_SIZE, "int", where)) \
            != (layers, hidden):
        raise AlignerError(f"{where}: metadata says {meta[PackKey.NUM_LAYERS]}x{meta[PackKey.HIDDEN_SIZE]}, tensors "
                           f"are {layers}x{hidden}")
    schema.field(meta, PackKey.MODE, "str", where, choices=MODES)
    per_layer = schema.field(meta, PackKey.PER_LAYER, "list", where, max_items=MAX_LAYERS)
    if len(per_layer) != layers:
        raise AlignerError(f"{where}: 'per_layer' has {len(per_layer)} entries for {layers} layers")
    for i, stats in enumerate(per_layer):
        here = f"{where}: per_layer[{i}]"
        schema.field(stats, LayerStatsKey.LAYER, "int", here, lo=i, hi=i)
        for rule in BIAS_RULES:
            schema.field(stats, LayerStatsKey.bias(rule), "float", here)
        schema.field(stats, LayerStatsKey.RESIDUAL_NORM, "float", here, default=None, lo=0.0)
    rec = schema.field(meta, PackKey.RECOMMENDED, "dict", where)
    here = f"{where}: recommended"
    schema.field(rec, RecommendedKey.GATE_LAYER, "int", here, lo=0, hi=layers - 1)
    _check_layers(schema.field(rec, RecommendedKey.STEER_LAYERS, "int_list", here, max_items=MAX_LAYERS), layers,
                  here, RecommendedKey.STEER_LAYERS)
    schema.field(rec, RecommendedKey.ALPHA, "float", here, lo=0.0)
    schema.field(rec, RecommendedKey.BIAS_RULE, "str", here, choices=BIAS_RULES)
    kind = gate_kind_named(schema.field(rec, RecommendedKey.GATE, "str", here, default="paper", choices=GATE_KINDS))
    schema.field(rec, RecommendedKey.SSV, "str", here, default="prompt", choices=SSV_MODES)
    schema.field(rec, RecommendedKey.SHIFT_MODE, "str", here, default=DEFAULT_SHIFT_MODE, choices=SHIFT_MODE_NAMES)
    schema.field(rec, RecommendedKey.ALPHA_PROFILE, "str", here, default="flat", choices=ALPHA_PROFILES)
    end_rule = schema.field(rec, RecommendedKey.END_RULE, "dict", here, default=None)
    if end_rule is not None:  # packs made before issue 17 have none
        try:
            EndRule.from_manifest(end_rule)
        except (KeyError, TypeError, ValueError) as exc:
            raise AlignerError(f"{here}: end_rule: {exc}") from None
    gate = schema.field(meta, PackKey.GATE, "dict", where, default=None)
    if (gate is None) != (gate_rows is None):
        raise AlignerError(f"{where}: the 'gate' metadata and the {GATE_WEIGHT} tensor must come together")
    if kind.pack_weights and gate is None:
        raise AlignerError(f"{where}: recommends the {kind.pack_name} gate but holds none")
    if gate is not None:
        here = f"{where}: gate"
        # A pack stores the weights of the kinds the contract's registry marks pack_weights (today version 2).
        fitted = GATE_KIND_REGISTRY[schema.field(gate, GateKey.VERSION, "int", here, choices=pack_weight_versions())]
        gate_layers = _check_layers(schema.field(gate, GateKey.LAYERS, "int_list", here, max_items=MAX_LAYERS),
                                    layers, here, GateKey.LAYERS)
        if gate_layers != sorted(gate_layers) or len(gate_layers) != gate_rows:
            raise AlignerError(f"{here}: 'layers' must be sorted and match the {gate_rows} rows of {GATE_WEIGHT}")
        schema.field(gate, GateKey.TOKENS, "int", here, lo=1, hi=MAX_TOKENS)
        schema.field(gate, GateKey.NORMALIZE, "bool", here)
        schema.field(gate, GateKey.BIAS, "float", here)
        schema.field(gate, GateKey.RULE, "str", here, default=None, choices=fitted.rules)
        if max_weight != fitted.max_weights:
            raise AlignerError(f"{here}: a version-{fitted.version} gate "
                               f"{'needs' if fitted.max_weights else 'has no'} {GATE_MAX_WEIGHT} tensor")
        if fitted.max_weights and version < MAX_WEIGHT_FORMAT:
            raise AlignerError(f"{where}: a format-{version} pack cannot hold a version-{fitted.version} gate "
                               f"(format {MAX_WEIGHT_FORMAT} and later can)")
        if kind.pack_weights and kind.version != fitted.version:
            raise AlignerError(f"{here}: the pack recommends the {kind.pack_name} gate but holds a version-"
                               f"{fitted.version} gate")
    elif max_weight:
        raise AlignerError(f"{where}: {GATE_MAX_WEIGHT} without a fitted gate")
    return meta


def save_pack(pack: SteeringPack, path) -> Path:
    """Writes the pack atomically: a temporary file beside ``path``, then a rename."""
    # deferred: safetensors (the export extra): a device install imports this module (inspect) without it
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in pack.tensors().items()}
    layers, hidden = _check_arrays(tensors, "pack")
    meta = {**pack.meta, PackKey.FORMAT_VERSION: pack.pack_format, PackKey.NUM_LAYERS: layers,
            PackKey.HIDDEN_SIZE: hidden, PackKey.SITE: SITE, PackKey.TOKEN: TOKEN}
    check_meta(meta, layers, hidden, None if pack.gate_weight is None else pack.gate_weight.shape[0], "pack",
               max_weight=pack.gate_max_weight is not None)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"inferaligner": json.dumps(meta, sort_keys=True)})
    pack.meta = meta
    return path


def _check_header_entry(entry, name: str, path: Path) -> None:
    shape, dtype = list(entry.get_shape()), entry.get_dtype()
    if dtype != "F32" or len(shape) != 2 or not (1 <= shape[0] <= MAX_LAYERS and 1 <= shape[1] <= MAX_HIDDEN) \
            or shape[0] * shape[1] > MAX_TENSOR_ELEMENTS:
        raise AlignerError(f"{path}: {name} must be a float32 [layers, hidden] tensor of at most "
                           f"{MAX_TENSOR_ELEMENTS} values, the header says {dtype} {shape[:8]}")


def load_pack(path) -> SteeringPack:
    """Reads and validates a pack; every problem is an :class:`AlignerError` naming the file."""
    # deferred: safetensors (the export extra): a device install imports this module (inspect) without it
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AlignerError(f"steering pack not found: {path}")
    try:
        with safe_open(str(path), framework="np") as fh:
            raw_meta = (fh.metadata() or {}).get("inferaligner")
            names = list(fh.keys())
            unknown = sorted(set(names) - set(TENSORS) - set(GATE_TENSORS))
            if unknown:
                raise AlignerError(f"{path}: unknown tensor {unknown[0][:80]!r} in the steering pack")
            for name in names:  # shapes and types from the header, before anything is allocated for the values
                _check_header_entry(fh.get_slice(name), name, path)
            tensors = {name: fh.get_tensor(name) for name in names}
    except AlignerError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError, OSError or ValueError
        raise AlignerError(f"{path}: not a safetensors steering pack ({schema.first_line(exc)})") from None
    except BaseException as exc:
        # A Rust panic reaches Python as pyo3's PanicException, which derives from BaseException.
        if type(exc).__name__ != "PanicException":
            raise
        raise AlignerError(f"{path}: not a safetensors steering pack (the reader failed: "
                           f"{schema.first_line(exc)})") from None
    if raw_meta is None:
        raise AlignerError(f"{path}: no 'inferaligner' metadata; not a steering pack")
    if len(raw_meta) > MAX_METADATA_BYTES:
        raise AlignerError(f"{path}: the 'inferaligner' metadata is over {MAX_METADATA_BYTES >> 20} MiB")
    meta = schema.loads(raw_meta, f"{path}: the 'inferaligner' metadata")
    layers, hidden = _check_arrays(tensors, str(path))
    gate_weight = tensors.get(GATE_WEIGHT)
    check_meta(meta, layers, hidden, None if gate_weight is None else gate_weight.shape[0], str(path),
               max_weight=GATE_MAX_WEIGHT in tensors)
    return SteeringPack(tensors["target.srv"], tensors["target.mean_harmful"], tensors["target.mean_harmless"],
                        tensors["aligned.srv"], meta, gate_weight, tensors.get(GATE_MAX_WEIGHT))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
