"""Loading and checking an export directory (docs/architecture.md §6, docs/contract.md, issue 14).

An export dir holds ``model.onnx`` (+ external data), the tokenizer files, the chat template,
``generation_config.json`` and the manifest ``inferaligner.json``. The same key facts sit in the graph's
``metadata_props`` under ``inferaligner.*``. :func:`load_export` fails closed. It refuses, with one line naming the
problem, when

- the manifest is missing, unreadable, over size, or any field it holds has the wrong kind or range;
- a format-2 manifest lacks any key the format requires (a missing key is a refusal, never a skipped check);
- the manifest and the graph's metadata disagree on a key fact, or the graph lacks one;
- the graph lacks the steering interface or its steering nodes sit on other layers than the manifest says;
- a steering constant, a steering function body, the wiring of a steered site, the tokenizer, the chat template, the
  generation config or (unless ``verify_weights=False``) a weight file differs from what was exported
  (:mod:`aligner_runtime.integrity`);
- the export's own validation against the PyTorch reference failed;
- the manifest is format 1 (no integrity digests), unless the caller passes ``allow_legacy=True``.

A model without steering loads only with ``allow_unsteered=True``, and is then marked unsteered.

The graph is read with :mod:`aligner_runtime.onnx_graph` instead of the ``onnx`` package, which the run-time does not
depend on (§2).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import integrity, schema
from .contract import (GATE_IN, GATE_OUT, MANIFEST_FILE, METADATA_PREFIX, MODEL_FILE, SCORE_OUT, SITE, STEER_GATE,
                       STEER_SHIFT, STEERING_IO, two_pass_prefill)
from .errors import AlignerError
from .onnx_graph import GraphSummary, read_graph_summary

SUPPORTED_FORMAT_VERSIONS = (1, 2)
LEGACY_FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 8 << 20
MAX_LAYERS, MAX_HIDDEN, MAX_TOKENS, MAX_CONTEXT = 4096, 1 << 20, 64, 1 << 24
STEER_IMPLS = ("function", "inline")
DTYPES = ("fp32", "fp16")

# Facts that the manifest and the graph's metadata_props both hold and must agree on.
KEY_FACTS = ("format_version", "pack_sha256", "target_fingerprint", "steer_layers", "gate_layer", "alpha", "bias",
             "bias_rule", "steer_impl", "dtype", "site", "chat_template_sha256", "num_layers", "hidden_size",
             "multimodal", "gate", "two_pass_prefill", "steering_io", "strength", "eos_token_ids", "context_length")
# Without these the runtime cannot know where the graph steers: their absence counts as "unsteered".
STEERING_FACTS = ("steer_layers", "gate_layer", "alpha", "bias")
# Every key a format-2 manifest of a steered export must hold (besides the optional "multimodal").
REQUIRED_V2 = ("format_version", "package_version", "pack_sha256", "target_fingerprint", "steer_layers", "gate_layer",
               "alpha", "bias", "bias_rule", "steer_impl", "dtype", "opset", "site", "chat_template_sha256",
               "num_layers", "hidden_size", "eos_token_ids", "context_length", "io", "gate", "two_pass_prefill",
               "steering_io", "validation", "integrity")


@dataclass
class ExportDir:
    """A checked export directory. ``steered`` is False only when the caller allowed an unsteered model."""

    path: Path
    manifest: dict
    manifest_sha256: str
    graph: GraphSummary | None
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
        """§5 rule 2, as the manifest records it (format 1 derives it with ``contract.two_pass_prefill``)."""
        if not self.steered or self.gate_layer is None:
            return False
        recorded = self.manifest.get("two_pass_prefill")
        return recorded if isinstance(recorded, bool) else two_pass_prefill(self.steer_layers, self.gate_layers)


def manifest_gate_layers(manifest: dict) -> list[int]:
    """G from a manifest: format 2's ``gate.layers``; format 1 has the one ``gate_layer``."""
    gate = manifest.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("layers"), list):
        return list(gate["layers"])
    return [manifest["gate_layer"]] if isinstance(manifest.get("gate_layer"), int) else []


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
    schema.field(entry, "image_token_id", "int", where, lo=0, hi=1 << 31)
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
    version = schema.field(manifest, "format_version", "int", where)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise AlignerError(f"{where} has format_version {version}; this runtime reads "
                           f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}")
    num_layers = schema.field(manifest, "num_layers", "int", where, default=MAX_LAYERS, lo=1, hi=MAX_LAYERS)
    schema.field(manifest, "hidden_size", "int", where, default=None, lo=1, hi=MAX_HIDDEN)
    if "steer_layers" in manifest:
        _layers(manifest, "steer_layers", where, num_layers)
    schema.field(manifest, "gate_layer", "int", where, default=None, lo=0, hi=num_layers - 1)
    schema.field(manifest, "alpha", "float", where, default=None, lo=0.0)
    schema.field(manifest, "bias", "float", where, default=None)
    for key in ("bias_rule", "package_version", "target_fingerprint", "exporter", "pack_mode"):
        schema.field(manifest, key, "str", where, default=None)
    schema.field(manifest, "steer_impl", "str", where, default=None, choices=STEER_IMPLS)
    schema.field(manifest, "dtype", "str", where, default=None, choices=DTYPES)
    schema.field(manifest, "site", "str", where, default=None, choices=(SITE,))
    schema.field(manifest, "opset", "int", where, default=None, lo=1, hi=1000)
    for key in ("chat_template_sha256", "pack_sha256"):
        schema.field(manifest, key, "sha256", where, default=None)
    schema.field(manifest, "eos_token_ids", "int_list", where, default=None, lo=0, hi=1 << 31, max_items=64)
    schema.field(manifest, "context_length", "int", where, default=None, lo=1, hi=MAX_CONTEXT)
    io = schema.field(manifest, "io", "dict", where, default=None)
    if io is not None:
        for kind in ("inputs", "outputs"):
            schema.field(io, kind, "str_list", f"{where}: io", max_items=10_000)
    validation = manifest.get("validation")
    if validation is not None:
        schema.field(manifest, "validation", "dict", where)
        if schema.field(validation, "passed", "bool", f"{where}: validation") is not True:
            raise AlignerError(f"{where}: the export failed its validation against the PyTorch reference")
    gate = schema.field(manifest, "gate", "dict", where, default=None)
    if gate is not None:
        here = f"{where}: gate"
        schema.field(gate, "version", "int", here, lo=1, hi=2)
        gate_layers = _layers(gate, "layers", here, num_layers)
        if not gate_layers:
            raise AlignerError(f"{here}: 'layers' is empty")
        schema.field(gate, "tokens", "int", here, lo=1, hi=MAX_TOKENS)
        schema.field(gate, "normalize", "bool", here)
        schema.field(gate, "bias", "float", here)
        if manifest.get("gate_layer") != gate_layers[-1]:
            raise AlignerError(f"{where}: 'gate_layer' must be the last of the gate layers")
    two_pass = schema.field(manifest, "two_pass_prefill", "bool", where, default=None)
    if two_pass is not None and "steer_layers" in manifest and gate is not None and \
            two_pass != two_pass_prefill(manifest["steer_layers"], gate["layers"]):
        raise AlignerError(f"{where}: 'two_pass_prefill' contradicts the gate and steered layers")
    steering_io = schema.field(manifest, "steering_io", "dict", where, default=None)
    if steering_io is not None and steering_io != STEERING_IO:
        raise AlignerError(f"{where}: 'steering_io' must be {STEERING_IO}")
    record = schema.field(manifest, "integrity", "dict", where, default=None)
    if record is not None:
        here = f"{where}: integrity"
        for key in ("constants", "functions", "files", "model_files"):
            _digest_map(record, key, here)
        for key in ("wiring", "nodes"):
            schema.field(record, key, "sha256", here)
    multimodal = schema.field(manifest, "multimodal", "dict", where, default=None)
    if multimodal is not None:
        _check_multimodal(multimodal, f"{where}: multimodal")
    strength = schema.field(manifest, "strength", "dict", where, default=None)
    if strength is not None:
        schema.field(strength, "half_life", "float", f"{where}: strength", lo=1e-3, hi=1e6)
        schema.field(strength, "floor", "float", f"{where}: strength", lo=0.0, hi=1.0)
    return manifest


def read_manifest(path: Path) -> tuple[dict, str]:
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise AlignerError(f"not an export directory (no {MANIFEST_FILE}): {path}")
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:
            raise AlignerError(f"the manifest {file} is over {MAX_MANIFEST_BYTES >> 20} MiB")
        raw = file.read_bytes()
    except OSError as exc:
        raise AlignerError(f"cannot read the manifest {file}: {exc.strerror}") from None
    manifest = check_manifest(schema.loads(raw, f"the manifest {file}"), f"the manifest {file}")
    return manifest, hashlib.sha256(raw).hexdigest()


def manifest_sha256(path: str | Path) -> str:
    return hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()


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


def _check_key_facts(manifest: dict, graph: GraphSummary, strict: bool) -> None:
    """The manifest and the graph's metadata agree. ``strict`` (format 2): every key fact the manifest holds must be
    in the graph too, so stripping the graph's metadata does not turn the comparison off."""
    for key in KEY_FACTS:
        meta_key = METADATA_PREFIX + key
        if key not in manifest:
            continue
        if meta_key not in graph.metadata:
            if strict:
                raise AlignerError(f"{MODEL_FILE} lacks the metadata {meta_key} that the manifest records "
                                   f"(tampered or mixed-up export)")
            continue
        try:
            recorded = schema.loads(graph.metadata[meta_key], meta_key)
        except AlignerError:
            recorded = graph.metadata[meta_key]
        if not _same(manifest[key], recorded):
            raise AlignerError(f"manifest and graph disagree on {key}: {str(manifest[key])[:60]!r} in {MANIFEST_FILE}, "
                               f"{graph.metadata[meta_key][:60]!r} in {MODEL_FILE} (tampered or mixed-up export)")


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


def _check_graph(path: Path, manifest: dict, graph: GraphSummary, legacy: bool, steering_declared: bool,
                 allow_unsteered: bool, verify_weights: bool) -> str | None:
    """The checks of the graph against the manifest; returns why the export does not steer (allowed only with
    ``allow_unsteered``), or None."""
    # A disagreement between the manifest and the graph's own record is refused even with allow_unsteered:
    # it means the directory was edited or mixed up, and nothing in it can be trusted.
    _check_key_facts(manifest, graph, strict=not legacy and steering_declared)
    io = manifest.get("io")
    if io is not None:
        for kind, names in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            if io[kind] != names:
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
    if problem is not None:
        if steering_declared and GATE_IN in graph.inputs:
            # The manifest and the graph both say "steered" but do not match: tampered, never "unsteered".
            raise AlignerError(f"{problem} (tampered or mixed-up export)")
        if not allow_unsteered:
            raise AlignerError(f"{problem}; pass allow_unsteered=True only to run it without safety steering")
    elif legacy:
        warnings.warn(f"{path}: a format-1 export, loaded without integrity checks (allow_legacy)", stacklevel=2)
    else:
        integrity.verify(path, manifest["integrity"], graph, manifest_gate_layers(manifest), manifest["steer_layers"],
                         manifest["steer_impl"], verify_model_files=verify_weights)
    return problem


def load_export(path: str | Path, allow_unsteered: bool = False, *, allow_legacy: bool = False,
                verify_weights: bool = True) -> ExportDir:
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
    legacy = manifest["format_version"] == LEGACY_FORMAT_VERSION
    steering_declared = all(k in manifest for k in STEERING_FACTS)
    if legacy and steering_declared and not allow_legacy:
        raise AlignerError(f"refusing {path}: it was exported by an older version (manifest format 1) and carries no "
                           f"integrity digests; export it again, or pass allow_legacy=True (Python API) to run it "
                           f"unverified")
    if not legacy and steering_declared:
        missing = [k for k in REQUIRED_V2 if k not in manifest]
        if missing:
            raise AlignerError(f"refusing {path}: the manifest lacks {', '.join(missing)} (tampered or truncated "
                               f"manifest)")
    graph = read_graph_summary(model)
    try:
        problem = _check_graph(path, manifest, graph, legacy, steering_declared, allow_unsteered, verify_weights)
    except AlignerError as exc:
        raise AlignerError(f"refusing {path}: {exc}") from None
    return ExportDir(path=path, manifest=manifest, manifest_sha256=digest, graph=graph, steered=problem is None,
                     unsteered_reason=problem)


def load_engine_export(path: str | Path) -> ExportDir:
    """The export beside a TensorRT engine shipped without its ONNX graph: a complete format-2 manifest whose
    tokenizer, template and config files match their digests. The engine's own checks (stamp, engine digest, the
    plugins' constants digests) are the TensorRT backend's."""
    path = Path(path)
    manifest, digest = read_manifest(path)
    missing = [k for k in REQUIRED_V2 if k not in manifest]
    if manifest["format_version"] == LEGACY_FORMAT_VERSION or missing:
        raise AlignerError(f"refusing {path}: an engine's export needs a complete format-2 manifest "
                           f"({', '.join(missing) or 'format 1'} missing); export and build again")
    integrity.verify_files(path, manifest["integrity"], verify_model_files=False)
    return ExportDir(path, manifest, digest, graph=None, steered=True)
