"""The manifest ``inferaligner.json`` (docs/contract.md "Manifest"): its key names, defined once, the facts it shares
with the graph's ``metadata_props``, the kind and range check of every field (:func:`check_manifest`) and the typed
view of a checked manifest (:class:`Manifest`). Numpy-free: it runs on a device with no torch and no onnx.

The C runtime reads the same keys in ``runtime/c/src/manifest.cpp``; ``tests/test_contract_sync.py`` keeps the two in
step."""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any, Mapping

from .. import schema
from ..errors import AlignerError
from .choices import (DTYPES, MAX_CONTEXT, MAX_EOS_IDS, MAX_HIDDEN, MAX_IO_NAMES, MAX_LAYERS, MAX_OPSET, MAX_TOKEN_ID,
                      MAX_TOKENS, STEER_IMPLS, STRENGTH_HALF_LIFE, END_RULE_LIMITS, DEFAULT_SHIFT_MODE,
                      SHIFT_MODE_NAMES)
from .names import SITE, STEERING_IO
from .steering import GATE_KINDS, GateKey, SteerConfig
from .protocol import EndRule, StrengthSchedule, two_pass_prefill

# Format 3 (issue 19) records each fact once: the gate's layers, bias and rule only in the ``gate`` object, where
# formats 1 and 2 also wrote them at the top level (``gate_layer``, ``bias``, ``bias_rule``). Format 2 added the
# integrity digests and the ``gate`` object to format 1. Every format keeps loading (docs/contract.md "Manifest").
FORMAT_VERSION = 3  # what the exporter writes
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
LEGACY_FORMAT_VERSION = 1  # no integrity digests
OLDEST_VERIFIED_FORMAT_VERSION = 2  # the first with integrity digests: the oldest an engine's export (and the C runtime) takes


class Key:
    """The manifest's top-level keys (a key fact is also ``inferaligner.<key>`` in the graph's metadata_props)."""

    FORMAT_VERSION = "format_version"
    PACKAGE_VERSION = "package_version"
    PACK_SHA256 = "pack_sha256"
    PACK_MODE = "pack_mode"
    TARGET_FINGERPRINT = "target_fingerprint"
    STEER_LAYERS = "steer_layers"
    GATE_LAYER = "gate_layer"
    ALPHA = "alpha"
    # α_l of each steered layer, {"<layer>": α_l}, when they differ (issue 17: ``--alpha-profile norm``); absent:
    # every steered layer has ``alpha``
    ALPHA_PER_LAYER = "alpha_per_layer"
    BIAS = "bias"
    BIAS_RULE = "bias_rule"
    STEER_IMPL = "steer_impl"
    SHIFT_MODE = "shift_mode"  # SteerShift's mode (issue 17); absent: "add", what every older export did
    GATE = "gate"
    TWO_PASS_PREFILL = "two_pass_prefill"
    STEERING_IO = "steering_io"
    DTYPE = "dtype"
    OPSET = "opset"
    SITE = "site"
    EXPORTER = "exporter"
    CHAT_TEMPLATE_SHA256 = "chat_template_sha256"
    CHAT_TEMPLATE_FALLBACK = "chat_template_fallback"
    NUM_LAYERS = "num_layers"
    HIDDEN_SIZE = "hidden_size"
    EOS_TOKEN_IDS = "eos_token_ids"
    CONTEXT_LENGTH = "context_length"
    STRENGTH = "strength"
    END_RULE = "end_rule"
    IO = "io"
    VALIDATION = "validation"
    WEIGHTS = "weights"
    INTEGRITY = "integrity"
    MULTIMODAL = "multimodal"


class IntegrityKey:
    """The keys of the manifest's ``integrity`` object (:mod:`aligner_runtime.integrity`)."""

    CONSTANTS = "constants"
    FUNCTIONS = "functions"
    FILES = "files"
    MODEL_FILES = "model_files"
    WIRING = "wiring"
    NODES = "nodes"


class StrengthKey:
    """The keys of the manifest's ``strength`` object (:meth:`StrengthSchedule.manifest`)."""

    HALF_LIFE = "half_life"
    FLOOR = "floor"


class EndRuleKey:
    """The keys of the manifest's ``end_rule`` object (:meth:`EndRule.manifest`)."""

    AFTER = "after"
    SLOPE = "slope"


class StampKey:
    """The keys of an engine's stamp ``ENGINE.json`` (written by ``aligner-export build``, read by both runtimes)."""

    FORMAT_VERSION = "format_version"
    MANIFEST_SHA256 = "manifest_sha256"
    ENGINE_FILE = "engine_file"
    PRECISION = "precision"
    STRONGLY_TYPED = "strongly_typed"
    TRT_VERSION = "trt_version"
    COMPUTE_CAPABILITY = "compute_capability"
    ENGINE_SHA256 = "engine_sha256"


# The top-level copies of gate facts that formats 1 and 2 wrote and format 3 refuses: the last gate layer, the bias
# and the bias rule (the ``gate`` object's ``layers[-1]``, ``bias`` and ``rule``).
GATE_DUPLICATES = (Key.GATE_LAYER, Key.BIAS, Key.BIAS_RULE)

# Facts that the manifest and the graph's metadata_props both hold and must agree on (those the manifest holds).
KEY_FACTS = (Key.FORMAT_VERSION, Key.PACK_SHA256, Key.TARGET_FINGERPRINT, Key.STEER_LAYERS, Key.GATE_LAYER, Key.ALPHA,
             Key.BIAS, Key.BIAS_RULE, Key.STEER_IMPL, Key.DTYPE, Key.SITE, Key.CHAT_TEMPLATE_SHA256, Key.NUM_LAYERS,
             Key.HIDDEN_SIZE, Key.MULTIMODAL, Key.GATE, Key.TWO_PASS_PREFILL, Key.STEERING_IO, Key.STRENGTH,
             Key.END_RULE, Key.EOS_TOKEN_IDS, Key.CONTEXT_LENGTH, Key.SHIFT_MODE, Key.ALPHA_PER_LAYER)
# Facts that also go into metadata_props beyond KEY_FACTS: enough to inspect a bare .onnx file.
METADATA_EXTRA = (Key.PACKAGE_VERSION, Key.OPSET, Key.VALIDATION, Key.EXPORTER, Key.PACK_MODE)
# Without these the runtime cannot know where the graph steers: their absence counts as "unsteered" (formats 1, 2;
# format 3: STEERING_FACTS_V3, the gate's layers and bias being in its ``gate`` object).
STEERING_FACTS = (Key.STEER_LAYERS, Key.GATE_LAYER, Key.ALPHA, Key.BIAS)
STEERING_FACTS_V3 = (Key.STEER_LAYERS, Key.GATE, Key.ALPHA)
# Every key a format-2 manifest of a steered export must hold (besides the optional "multimodal").
REQUIRED_V2 = (Key.FORMAT_VERSION, Key.PACKAGE_VERSION, Key.PACK_SHA256, Key.TARGET_FINGERPRINT, Key.STEER_LAYERS,
               Key.GATE_LAYER, Key.ALPHA, Key.BIAS, Key.BIAS_RULE, Key.STEER_IMPL, Key.DTYPE, Key.OPSET, Key.SITE,
               Key.CHAT_TEMPLATE_SHA256, Key.NUM_LAYERS, Key.HIDDEN_SIZE, Key.EOS_TOKEN_IDS, Key.CONTEXT_LENGTH, Key.IO,
               Key.GATE, Key.TWO_PASS_PREFILL, Key.STEERING_IO, Key.VALIDATION, Key.INTEGRITY)
# Format 3: format 2's keys less the duplicates of the gate object.
REQUIRED_V3 = tuple(k for k in REQUIRED_V2 if k not in GATE_DUPLICATES)


def steering_facts(version) -> tuple[str, ...]:
    """The keys whose presence declares a steered export, in a manifest of format ``version``."""
    return STEERING_FACTS_V3 if isinstance(version, int) and version >= 3 else STEERING_FACTS


def required_keys(version) -> tuple[str, ...]:
    """Every key a steered export's manifest of format ``version`` (2 or later) must hold."""
    return REQUIRED_V3 if isinstance(version, int) and version >= 3 else REQUIRED_V2


def steering_declared(manifest: dict) -> bool:
    """Whether the manifest declares steering (every key of :func:`steering_facts` present)."""
    return all(k in manifest for k in steering_facts(manifest.get(Key.FORMAT_VERSION)))


def steering_record(config: SteerConfig, alpha: float, alphas: Mapping[int, float] | None = None) -> dict:
    """The steering part of a format-:data:`FORMAT_VERSION` manifest, from the one configuration object: the format,
    the steered layers, α (and ``alphas``, each steered layer's α_l, when they are not all α), the shift, the gate
    (its layers, bias and rule recorded once, in ``gate``), the two-pass rule and the steering I/O names. The
    exporter adds the model's, the files' and the validation's facts."""
    record = {Key.FORMAT_VERSION: FORMAT_VERSION, Key.STEER_LAYERS: config.steer_layers, Key.ALPHA: float(alpha),
              Key.STEER_IMPL: config.steer_impl, Key.SHIFT_MODE: config.shift_mode, Key.GATE: config.gate.manifest(),
              Key.TWO_PASS_PREFILL: config.two_pass, Key.STEERING_IO: dict(STEERING_IO)}
    if alphas is not None and any(float(a) != float(alpha) for a in alphas.values()):
        record[Key.ALPHA_PER_LAYER] = {str(int(l)): float(a) for l, a in sorted(alphas.items())}
    return record


def _alpha_per_layer(manifest: dict, where: str) -> None:
    """``alpha_per_layer``: one finite α_l > 0 per steered layer, keyed by the layer's decimal number."""
    value = schema.field(manifest, Key.ALPHA_PER_LAYER, "dict", where, default=None)
    if value is None:
        return
    steered = {str(l) for l in manifest.get(Key.STEER_LAYERS) or ()}
    if set(value) != steered:
        raise AlignerError(f"{where}: '{Key.ALPHA_PER_LAYER}' must name exactly the steered layers "
                           f"{sorted(int(l) for l in steered)}, it names {sorted(value)[:8]}")
    for layer in value:
        schema.field(value, layer, "float", f"{where}: {Key.ALPHA_PER_LAYER}", lo=0.0)


def manifest_gate_layers(manifest: dict) -> list[int]:
    """G from a manifest: ``gate.layers`` (formats 2, 3); format 1 has the one ``gate_layer``."""
    gate = manifest.get(Key.GATE)
    if isinstance(gate, dict) and isinstance(gate.get(GateKey.LAYERS), list):
        return list(gate[GateKey.LAYERS])
    return [manifest[Key.GATE_LAYER]] if isinstance(manifest.get(Key.GATE_LAYER), int) else []


def manifest_gate_layer(manifest: dict) -> int | None:
    """g*, the last gate layer, where the decision is taken (None when the manifest records no gate)."""
    layers = manifest_gate_layers(manifest)
    return layers[-1] if layers and isinstance(layers[-1], int) else None


def manifest_gate_bias(manifest: dict):
    """The gate's bias: ``gate.bias`` (formats 2, 3), format 1's top-level ``bias``; None when neither is there."""
    gate = manifest.get(Key.GATE)
    if isinstance(gate, dict) and GateKey.BIAS in gate:
        return gate[GateKey.BIAS]
    return manifest.get(Key.BIAS)


def manifest_gate_rule(manifest: dict):
    """The gate's rule: ``gate.rule`` (format 3, and format 2 since it was written), else the top-level
    ``bias_rule`` of formats 1 and 2; None when neither is there."""
    gate = manifest.get(Key.GATE)
    if isinstance(gate, dict) and GateKey.RULE in gate:
        return gate[GateKey.RULE]
    return manifest.get(Key.BIAS_RULE)


def _layers(manifest: dict, key: str, where: str, num_layers: int) -> list[int]:
    values = schema.field(manifest, key, "int_list", where, lo=0, hi=num_layers - 1, max_items=MAX_LAYERS)
    if len(set(values)) != len(values) or values != sorted(values):
        raise AlignerError(f"{where}: '{key}' must list distinct layers in ascending order")
    return values


def _digest_map(obj: dict, key: str, where: str) -> dict:
    values = schema.field(obj, key, "dict", where)
    for name in values:
        schema.field(values, name, "sha256", f"{where}: {key}")
    return values


def _file_name(obj: dict, key: str, where: str) -> str:
    """A file of the export directory named in the manifest: a plain name, never a path out of the directory."""
    name = schema.field(obj, key, "str", where)
    if not name or name in (".", "..") or "/" in name or "\\" in name or not name.isprintable() \
            or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise AlignerError(f"{where}: {key!r} must be a file name of the export directory, got {name[:80]!r}")
    return name


def _check_multimodal(entry: dict, where: str) -> None:
    """The kinds of what :class:`aligner_runtime.multimodal.MultimodalSpec` converts (docs/multimodal.md)."""
    for key in ("vision_model", "embed_model"):
        _file_name(entry, key, where)
    schema.field(entry, "image_token", "str", where)
    schema.field(entry, "image_token_id", "int", where, lo=0, hi=MAX_TOKEN_ID)
    schema.field(entry, "placement", "str", where)
    schema.field(entry, "preprocessing", "dict", where)
    # null where the architecture does not use them (LLaVA-NeXT has no fixed image_seq_length, LLaVA no anyres)
    if entry.get("architecture") is not None:
        schema.field(entry, "architecture", "str", where)
    if entry.get("image_seq_length") is not None:
        schema.field(entry, "image_seq_length", "int", where, lo=1, hi=MAX_CONTEXT)
    if entry.get("anyres") is not None:
        schema.field(entry, "anyres", "dict", where)


def check_manifest(manifest, where: str) -> dict:
    """Checks the kind and range of every field the run-time uses (those present); returns ``manifest``."""
    if not isinstance(manifest, dict):
        raise AlignerError(f"{where} is not a JSON object")
    version = schema.field(manifest, Key.FORMAT_VERSION, "int", where)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise AlignerError(f"{where} has format_version {version}; this runtime reads "
                           f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}")
    duplicated = [k for k in GATE_DUPLICATES if k in manifest] if version >= 3 else []
    if duplicated:
        raise AlignerError(f"{where}: format {version} records the gate's layers, bias and rule once, in 'gate'; "
                           f"it must not hold {', '.join(repr(k) for k in duplicated)}")
    num_layers = schema.field(manifest, Key.NUM_LAYERS, "int", where, default=MAX_LAYERS, lo=1, hi=MAX_LAYERS)
    schema.field(manifest, Key.HIDDEN_SIZE, "int", where, default=None, lo=1, hi=MAX_HIDDEN)
    if Key.STEER_LAYERS in manifest:
        _layers(manifest, Key.STEER_LAYERS, where, num_layers)
    schema.field(manifest, Key.GATE_LAYER, "int", where, default=None, lo=0, hi=num_layers - 1)
    schema.field(manifest, Key.ALPHA, "float", where, default=None, lo=0.0)
    _alpha_per_layer(manifest, where)
    schema.field(manifest, Key.BIAS, "float", where, default=None)
    for key in (Key.BIAS_RULE, Key.PACKAGE_VERSION, Key.TARGET_FINGERPRINT, Key.EXPORTER, Key.PACK_MODE):
        schema.field(manifest, key, "str", where, default=None)
    schema.field(manifest, Key.STEER_IMPL, "str", where, default=None, choices=STEER_IMPLS)
    schema.field(manifest, Key.SHIFT_MODE, "str", where, default=None, choices=SHIFT_MODE_NAMES)
    schema.field(manifest, Key.DTYPE, "str", where, default=None, choices=DTYPES)
    schema.field(manifest, Key.SITE, "str", where, default=None, choices=(SITE,))
    schema.field(manifest, Key.OPSET, "int", where, default=None, lo=1, hi=MAX_OPSET)
    for key in (Key.CHAT_TEMPLATE_SHA256, Key.PACK_SHA256):
        schema.field(manifest, key, "sha256", where, default=None)
    schema.field(manifest, Key.EOS_TOKEN_IDS, "int_list", where, default=None, lo=0, hi=MAX_TOKEN_ID,
                 max_items=MAX_EOS_IDS)
    schema.field(manifest, Key.CONTEXT_LENGTH, "int", where, default=None, lo=1, hi=MAX_CONTEXT)
    io = schema.field(manifest, Key.IO, "dict", where, default=None)
    if io is not None:
        for kind in ("inputs", "outputs"):
            schema.field(io, kind, "str_list", f"{where}: io", max_items=MAX_IO_NAMES)
    validation = manifest.get(Key.VALIDATION)
    if validation is not None:
        schema.field(manifest, Key.VALIDATION, "dict", where)
        if schema.field(validation, "passed", "bool", f"{where}: validation") is not True:
            raise AlignerError(f"{where}: the export failed its validation against the PyTorch reference")
    gate = schema.field(manifest, Key.GATE, "dict", where, default=None)
    if gate is not None:
        here = f"{where}: gate"
        kind = GATE_KINDS[schema.field(gate, GateKey.VERSION, "int", here, choices=tuple(GATE_KINDS))]
        gate_layers = _layers(gate, GateKey.LAYERS, here, num_layers)
        if not gate_layers:
            raise AlignerError(f"{here}: 'layers' is empty")
        schema.field(gate, GateKey.TOKENS, "int", here, lo=1, hi=MAX_TOKENS)
        schema.field(gate, GateKey.NORMALIZE, "bool", here)
        bias = schema.field(gate, GateKey.BIAS, "float", here)
        # The rule is the one record of it from format 3 on; format-2 manifests written before it was there lack it.
        schema.field(gate, GateKey.RULE, "str", here, default=None if version < 3 else schema.MISSING,
                     choices=kind.rules)
        if version < 3:  # the top-level copies formats 1 and 2 wrote must say what the gate object says
            if manifest.get(Key.GATE_LAYER) != gate_layers[-1]:
                raise AlignerError(f"{where}: 'gate_layer' must be the last of the gate layers")
            if Key.BIAS in manifest and float(manifest[Key.BIAS]) != bias:
                raise AlignerError(f"{where}: 'bias' must be the gate's bias")
    two_pass = schema.field(manifest, Key.TWO_PASS_PREFILL, "bool", where, default=None)
    if two_pass is not None and Key.STEER_LAYERS in manifest and gate is not None and \
            two_pass != two_pass_prefill(manifest[Key.STEER_LAYERS], gate[GateKey.LAYERS]):
        raise AlignerError(f"{where}: 'two_pass_prefill' contradicts the gate and steered layers")
    steering_io = schema.field(manifest, Key.STEERING_IO, "dict", where, default=None)
    if steering_io is not None and steering_io != STEERING_IO:
        raise AlignerError(f"{where}: 'steering_io' must be {STEERING_IO}")
    record = schema.field(manifest, Key.INTEGRITY, "dict", where, default=None)
    if record is not None:
        here = f"{where}: integrity"
        for key in (IntegrityKey.CONSTANTS, IntegrityKey.FUNCTIONS, IntegrityKey.FILES,
                    IntegrityKey.MODEL_FILES):
            _digest_map(record, key, here)
        for key in (IntegrityKey.WIRING, IntegrityKey.NODES):
            schema.field(record, key, "sha256", here)
    multimodal = schema.field(manifest, Key.MULTIMODAL, "dict", where, default=None)
    if multimodal is not None:
        _check_multimodal(multimodal, f"{where}: multimodal")
    strength = schema.field(manifest, Key.STRENGTH, "dict", where, default=None)
    if strength is not None:
        low, high = STRENGTH_HALF_LIFE
        schema.field(strength, StrengthKey.HALF_LIFE, "float", f"{where}: strength", lo=low, hi=high)
        schema.field(strength, StrengthKey.FLOOR, "float", f"{where}: strength", lo=0.0, hi=1.0)
    end_rule = schema.field(manifest, Key.END_RULE, "dict", where, default=None)
    if end_rule is not None:  # docs/contract.md "Ending a steered answer"
        low, high = END_RULE_LIMITS["after"]
        schema.field(end_rule, EndRuleKey.AFTER, "int", f"{where}: end_rule", lo=low, hi=high)
        low, high = END_RULE_LIMITS["slope"]
        slope = schema.field(end_rule, EndRuleKey.SLOPE, "float", f"{where}: end_rule", lo=low, hi=high)
        if not slope > 0:
            raise AlignerError(f"{where}: end_rule slope must be > 0, got {slope}")
    return manifest


@dataclass(frozen=True)
class Manifest:
    """A checked manifest, typed. ``raw`` is the JSON object itself (what digests and the metadata comparison read);
    the fields are the facts a runtime acts on. Build it with :meth:`from_json`, which runs :func:`check_manifest`."""

    raw: dict = dc_field(repr=False)
    format_version: int
    steer_layers: tuple[int, ...]
    gate_layers: tuple[int, ...]
    gate_layer: int | None
    alpha: float | None
    bias: float | None
    gate_rule: str | None
    gate_version: int  # format 1 records no gate object: its gate is the paper's, version 1
    steer_impl: str | None
    dtype: str | None
    num_layers: int | None
    hidden_size: int | None
    eos_token_ids: tuple[int, ...]
    context_length: int | None
    strength: StrengthSchedule
    two_pass: bool
    end_rule: EndRule = EndRule()
    shift_mode: str = DEFAULT_SHIFT_MODE
    alpha_per_layer: dict[int, float] | None = None  # None: every steered layer has ``alpha``

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Manifest":
        raw = check_manifest(obj, where)
        steer_layers = tuple(raw.get(Key.STEER_LAYERS) or ())
        gate_layers = tuple(manifest_gate_layers(raw))
        recorded = raw.get(Key.TWO_PASS_PREFILL)
        two_pass = recorded if isinstance(recorded, bool) else two_pass_prefill(steer_layers, gate_layers)
        gate = raw.get(Key.GATE) or {}
        return cls(raw=raw, format_version=raw[Key.FORMAT_VERSION], steer_layers=steer_layers,
                   gate_layers=gate_layers, gate_layer=manifest_gate_layer(raw), alpha=raw.get(Key.ALPHA),
                   bias=manifest_gate_bias(raw), gate_rule=manifest_gate_rule(raw),
                   gate_version=gate.get(GateKey.VERSION, 1), steer_impl=raw.get(Key.STEER_IMPL), dtype=raw.get(Key.DTYPE),
                   num_layers=raw.get(Key.NUM_LAYERS), hidden_size=raw.get(Key.HIDDEN_SIZE),
                   eos_token_ids=tuple(raw.get(Key.EOS_TOKEN_IDS) or ()), context_length=raw.get(Key.CONTEXT_LENGTH),
                   strength=StrengthSchedule.from_manifest(raw.get(Key.STRENGTH)), two_pass=bool(two_pass),
                   end_rule=EndRule.from_manifest(raw.get(Key.END_RULE)),
                   shift_mode=raw.get(Key.SHIFT_MODE, DEFAULT_SHIFT_MODE),
                   alpha_per_layer={int(l): float(a) for l, a in raw[Key.ALPHA_PER_LAYER].items()}
                   if Key.ALPHA_PER_LAYER in raw else None)

    def alphas(self) -> dict[int, float]:
        """α_l of every steered layer."""
        return dict(self.alpha_per_layer) if self.alpha_per_layer else {l: self.alpha for l in self.steer_layers}

    @property
    def legacy(self) -> bool:
        return self.format_version == LEGACY_FORMAT_VERSION

    @property
    def steering_declared(self) -> bool:
        return steering_declared(self.raw)

    def missing_required(self) -> list[str]:
        """The keys a manifest of this format (2 or later) must hold that this one lacks."""
        return [k for k in required_keys(self.format_version) if k not in self.raw]

    def to_json(self) -> dict:
        return dict(self.raw)
