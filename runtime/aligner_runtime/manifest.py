"""Loading and checking an export directory (docs/architecture.md §6, docs/contract.md, issue 14).

An export dir holds ``model.onnx`` (+ external data), the tokenizer files, the chat template,
``generation_config.json`` and the manifest ``inferaligner.json``. The same key facts sit in the graph's
``metadata_props`` under ``inferaligner.*``. :func:`load_export` fails closed. It refuses, with one line naming the
problem, when

- the manifest is missing, unreadable, over size, or any field it holds has the wrong kind or range;
- a format-2 or format-3 manifest lacks any key its format requires (a missing key is a refusal, never a skipped check);
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

from . import integrity, schema, signing
from .contract import (GATE_IN, GATE_OUT, INPUTS_EMBEDS, MANIFEST_FILE, METADATA_PREFIX, MODEL_FILE, SCORE_OUT,
                       STEER_GATE, STEER_SHIFT, two_pass_prefill)
# The limits and key tuples are re-exported: callers and tests import them from here.
from .contract.choices import (DTYPES, MAX_CONTEXT, MAX_HIDDEN, MAX_LAYERS, MAX_MANIFEST_BYTES,  # noqa: F401
                               MAX_TOKENS, STEER_IMPLS)
from .contract.manifest import (KEY_FACTS, LEGACY_FORMAT_VERSION, OLDEST_VERIFIED_FORMAT_VERSION,  # noqa: F401
                                REQUIRED_V2, REQUIRED_V3, STEERING_FACTS, SUPPORTED_FORMAT_VERSIONS, Key, Manifest,
                                check_manifest, manifest_gate_layer, manifest_gate_layers, required_keys,
                                steering_declared, steering_facts)
from .errors import AlignerError
from .multimodal import MultimodalSpec
from .onnx_graph import GraphSummary, read_graph_summary

@dataclass
class ExportDir:
    """A checked export directory. ``steered`` is False only when the caller allowed an unsteered model."""

    path: Path
    manifest: dict
    manifest_sha256: str
    graph: GraphSummary | None
    steered: bool
    unsteered_reason: str | None = None
    signature: "signing.SignatureCheck | None" = None  # the signature check's outcome (aligner_runtime.signing)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def gate_layer(self) -> int | None:
        """g*: the last gate layer, where the decision is taken."""
        return manifest_gate_layer(self.manifest)

    @property
    def facts(self) -> Manifest:
        """The manifest, typed (:class:`~aligner_runtime.contract.Manifest`): the same facts whatever its format."""
        return Manifest.from_json(self.manifest, str(self.path / MANIFEST_FILE))

    @property
    def gate_layers(self) -> list[int]:
        """G: every layer a SteerGate node reads."""
        return manifest_gate_layers(self.manifest)

    @property
    def steer_layers(self) -> list[int]:
        return list(self.manifest.get(Key.STEER_LAYERS) or [])

    @property
    def two_pass(self) -> bool:
        """§5 rule 2, as the manifest records it (format 1 derives it with ``contract.two_pass_prefill``)."""
        if not self.steered or self.gate_layer is None:
            return False
        recorded = self.manifest.get(Key.TWO_PASS_PREFILL)
        return recorded if isinstance(recorded, bool) else two_pass_prefill(self.steer_layers, self.gate_layers)


def read_manifest(path: Path) -> tuple[dict, str]:
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise AlignerError(f"not an export directory (no {MANIFEST_FILE}): {path}")
    raw = schema.read_bounded(file, MAX_MANIFEST_BYTES, "the manifest")
    manifest = check_manifest(schema.loads(raw, f"the manifest {file}"), f"the manifest {file}")
    return manifest, hashlib.sha256(raw).hexdigest()


def manifest_sha256(path: str | Path) -> str:
    return hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()


def same_fact(a, b) -> bool:
    """Whether two values of a key fact agree (numbers to a relative 1e-6, lists and objects item by item)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        except OverflowError:  # an integer beyond the float range (from an untrusted side) equals only itself
            return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_fact(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_fact(a[k], b[k]) for k in a)
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
        if not same_fact(manifest[key], recorded):
            raise AlignerError(f"manifest and graph disagree on {key}: {str(manifest[key])[:60]!r} in {MANIFEST_FILE}, "
                               f"{graph.metadata[meta_key][:60]!r} in {MODEL_FILE} (tampered or mixed-up export)")


def _steering_problem(manifest: dict, graph: GraphSummary) -> str | None:
    """Why this graph cannot be trusted to steer as its manifest says, or None."""
    missing = [k for k in steering_facts(manifest[Key.FORMAT_VERSION]) if k not in manifest]
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
    if shift_layers != set(manifest[Key.STEER_LAYERS]):
        return (f"the graph's SteerShift nodes sit on layers {sorted(shift_layers)} but the manifest says "
                f"steer_layers {sorted(manifest[Key.STEER_LAYERS])}")
    return None


def _check_graph(path: Path, manifest: dict, graph: GraphSummary, legacy: bool, declared: bool,
                 allow_unsteered: bool, verify_weights: bool) -> str | None:
    """The checks of the graph against the manifest; returns why the export does not steer (allowed only with
    ``allow_unsteered``), or None."""
    # A disagreement between the manifest and the graph's own record is refused even with allow_unsteered:
    # it means the directory was edited or mixed up, and nothing in it can be trusted.
    _check_key_facts(manifest, graph, strict=not legacy and declared)
    io = manifest.get(Key.IO)
    if io is not None:
        for kind, names in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            if io[kind] != names:
                raise AlignerError(f"manifest and graph disagree on the graph {kind} (tampered or mixed-up export)")

    multimodal = MultimodalSpec.from_manifest(manifest)
    if multimodal is not None:
        multimodal.check_files(path)
        if INPUTS_EMBEDS not in graph.inputs:
            raise AlignerError(f"manifest and graph disagree: the manifest describes a vision-language export but "
                               f"{MODEL_FILE} does not take {INPUTS_EMBEDS} (tampered or mixed-up export)")
    problem = _steering_problem(manifest, graph)
    if problem is None and not any(k.startswith(METADATA_PREFIX) for k in graph.metadata):
        problem = f"the graph carries no {METADATA_PREFIX}* metadata"
    if problem is not None:
        if declared and GATE_IN in graph.inputs:
            # The manifest and the graph both say "steered" but do not match: tampered, never "unsteered".
            raise AlignerError(f"{problem} (tampered or mixed-up export)")
        if not allow_unsteered:
            raise AlignerError(f"{problem}; pass allow_unsteered=True only to run it without safety steering")
    elif legacy:
        warnings.warn(f"{path}: a format-1 export, loaded without integrity checks (allow_legacy)", stacklevel=2)
    else:
        integrity.verify(path, manifest[Key.INTEGRITY], graph, manifest_gate_layers(manifest), manifest[Key.STEER_LAYERS],
                         manifest[Key.STEER_IMPL], verify_model_files=verify_weights)
    return problem


def _check_signature(path: Path, digest: str, trusted_keys, expect_sha256) -> "signing.SignatureCheck":
    try:
        return signing.check_export(path, digest, trusted_keys=trusted_keys, expect_sha256=expect_sha256)
    except AlignerError as exc:
        raise AlignerError(f"refusing {path}: {exc}") from None


def load_export(path: str | Path, allow_unsteered: bool = False, *, allow_legacy: bool = False,
                verify_weights: bool = True, trusted_keys=None, expect_sha256: str | None = None) -> ExportDir:
    """Reads and checks an export directory; see the module docstring for what is refused. ``trusted_keys`` and
    ``expect_sha256``: :func:`aligner_runtime.signing.check_export` (with a trusted key configured, only a signed
    export loads)."""
    path = Path(path)
    if not path.exists():
        raise AlignerError(f"export directory not found: {path}")
    if not path.is_dir():
        raise AlignerError(f"not an export directory: {path}")
    manifest, digest = read_manifest(path)
    signature = _check_signature(path, digest, trusted_keys, expect_sha256)
    model = path / MODEL_FILE
    if not model.is_file():
        raise AlignerError(f"export directory has no {MODEL_FILE}: {path}")
    legacy = manifest[Key.FORMAT_VERSION] == LEGACY_FORMAT_VERSION
    declared = steering_declared(manifest)
    if legacy and declared and not allow_legacy:
        raise AlignerError(f"refusing {path}: it was exported by an older version (manifest format 1) and carries no "
                           f"integrity digests; export it again, or pass allow_legacy=True (Python API) to run it "
                           f"unverified")
    if not legacy and declared:
        missing = [k for k in required_keys(manifest[Key.FORMAT_VERSION]) if k not in manifest]
        if missing:
            raise AlignerError(f"refusing {path}: the manifest lacks {', '.join(missing)} (tampered or truncated "
                               f"manifest)")
    graph = read_graph_summary(model)
    try:
        problem = _check_graph(path, manifest, graph, legacy, declared, allow_unsteered, verify_weights)
    except AlignerError as exc:
        raise AlignerError(f"refusing {path}: {exc}") from None
    return ExportDir(path=path, manifest=manifest, manifest_sha256=digest, graph=graph, steered=problem is None,
                     unsteered_reason=problem, signature=signature)


def load_engine_export(path: str | Path, *, trusted_keys=None, expect_sha256: str | None = None) -> ExportDir:
    """The export beside a TensorRT engine shipped without its ONNX graph: a complete format-2 or -3 manifest whose
    tokenizer, template and config files match their digests. The engine's own checks (stamp, engine digest, the
    plugins' constants digests) are the TensorRT backend's."""
    path = Path(path)
    manifest, digest = read_manifest(path)
    signature = _check_signature(path, digest, trusted_keys, expect_sha256)
    missing = [k for k in required_keys(manifest[Key.FORMAT_VERSION]) if k not in manifest]
    if manifest[Key.FORMAT_VERSION] < OLDEST_VERIFIED_FORMAT_VERSION or missing:
        raise AlignerError(f"refusing {path}: an engine's export needs a complete manifest of format 2 or later "
                           f"({', '.join(missing) or 'format 1'} missing); export and build again")
    integrity.verify_files(path, manifest[Key.INTEGRITY], verify_model_files=False)
    return ExportDir(path, manifest, digest, graph=None, steered=True, signature=signature)
