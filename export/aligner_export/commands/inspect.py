"""``aligner-export inspect PATH``: a steering pack, an export directory, a bare ``.onnx`` file or a TensorRT engine.

A verifier, not an echo of the manifest (issue 21). For an export directory it reports

- the load check: whether ``aligner_runtime.manifest.load_export`` accepts the directory (the manifest's kinds, the
  manifest/graph key facts, every integrity digest, the weights included), or its refusal;
- the signature check against the trusted keys configured (``--trusted-key``, ``$INFERALIGNER_TRUSTED_KEYS`` or the
  runtime's config file; ``aligner_runtime.signing``), and ``--expect-sha256``;
- the steering self-test's constants part (``aligner_runtime.selftest``: zero, non-finite or lopsided vectors, a gate
  that can never fire), read from the graph itself;
- what the graph holds (read with the runtime's torch- and onnx-free walker, so it runs in a device install), and
  every disagreement with what the manifest says: layers, gate bias, α against the vector norms, the validation.

Malformed input of any kind is one line on stderr and exit status 2, never a traceback. No torch import (STYLE.md);
graphs are read without their external weight files (the load check hashes those files, it does not load them).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from aligner_runtime import schema, signing
from aligner_runtime.contract import (GATE_IN, GATE_OUT, MANIFEST_FILE, METADATA_PREFIX, MODEL_FILE, OP_TYPES,
                                      SCORE_OUT, SHIFT_MODES, STAMP_FILE, GateKey, Key, StampKey, two_pass_prefill)
from aligner_runtime.contract.choices import DEFAULT_SHIFT_MODE, MAX_MANIFEST_BYTES
from aligner_runtime.contract.pack import LayerStatsKey, ModelInfoKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError
from aligner_runtime.manifest import KEY_FACTS, load_export, same_fact
from aligner_runtime.onnx_graph import QUANTIZED_OPS, read_graph_summary
from aligner_runtime.selftest import constant_problems, steering_facts
from aligner_runtime.signing import add_trust_options

from aligner_export.pack import file_sha256, load_pack

MAX_STAMP_BYTES = 1 << 20
MAX_SHOWN = 24  # list items and characters of a value a line shows


def configure(parser) -> None:
    parser.add_argument("path", help="a steering pack (.safetensors), an export directory, a .onnx file or an engine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_trust_options(parser, "the signature check passes only for an export signed by one")


def run(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise AlignerError(f"not found: {path}")
    try:
        info = describe(path, trusted_keys=args.trusted_key, expect_sha256=args.expect_sha256)
        text = json.dumps(info, indent=2, sort_keys=True, default=str) if args.json else render(info)
    except AlignerError:
        raise
    except RecursionError:
        raise AlignerError(f"{path}: nested too deeply to describe") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, OSError) as exc:
        # Every field is type-checked before use (tests/fuzz covers describe() without this guard); this keeps a
        # missed case a one-line error instead of a traceback.
        raise AlignerError(f"{path}: cannot describe it ({type(exc).__name__}: {schema.first_line(exc, 100)})") \
            from None
    # a file name or manifest string may hold lone surrogates, which no terminal encoding takes
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"))
    return 0


def describe(path: Path, trusted_keys=None, expect_sha256: str | None = None) -> dict:
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return describe_export_dir(path, trusted_keys, expect_sha256)
        if (path / STAMP_FILE).is_file():
            return describe_engine(path / STAMP_FILE)
        raise AlignerError(f"{path}: neither an export directory ({MANIFEST_FILE}) nor an engine directory "
                           f"({STAMP_FILE})")
    suffix = path.suffix.lower()
    if path.name == MANIFEST_FILE:
        return describe_export_dir(path.parent, trusted_keys, expect_sha256)
    if suffix == ".safetensors":
        return describe_pack(path)
    if suffix == ".onnx":
        return describe_onnx(path)
    if suffix in (".engine", ".plan", ".trt") or path.name == STAMP_FILE:
        return describe_engine(path if path.name == STAMP_FILE else path.parent / STAMP_FILE)
    raise AlignerError(f"{path}: unknown kind of file (expected .safetensors, .onnx, an engine or a directory)")


# --- typed reads of untrusted values ---------------------------------------------------------------------------------
def _get(obj, key, kind: str):
    """``obj[key]`` when ``obj`` is a dict and the value is of ``kind``, else None (inspect reports, it does not
    refuse: a value of the wrong kind is shown as missing and the load check names it)."""
    if not isinstance(obj, dict) or key not in obj:
        return None
    value = obj[key]
    if kind == "dict":
        return value if isinstance(value, dict) else None
    if kind == "list":
        return value if isinstance(value, list) else None
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if math.isfinite(value) else None
    if kind == "int_list":
        return value if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in value) else None
    raise ValueError(kind)


def _fmt(value, depth: int = 0) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if depth > 3:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        text = ", ".join(f"{_short(k)}: {_fmt(v, depth + 1)}" for k, v in items[:MAX_SHOWN])
        return text + (f", … ({len(items)} entries)" if len(items) > MAX_SHOWN else "")
    if isinstance(value, (list, tuple)):
        text = ", ".join(_fmt(v, depth + 1) for v in value[:MAX_SHOWN])
        return "[" + text + (f", … ({len(value)} items)" if len(value) > MAX_SHOWN else "") + "]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return "(an integer of more than 30 digits)"
    return _short(value)


def _short(value, limit: int = 200) -> str:
    text = str(value)
    text = text if len(text) <= limit else text[:limit] + "…"
    return text if text.isprintable() else repr(text)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


# --- packs -----------------------------------------------------------------------------------------------------------
def describe_pack(path: Path) -> dict:
    pack = load_pack(path)  # validates the tensors and the metadata the exporter uses (one AlignerError otherwise)
    meta = pack.meta
    rec = pack.recommended
    gate = int(rec[RecommendedKey.GATE_LAYER])
    stats = pack.layer_stats(gate)
    alpha = _get(rec, RecommendedKey.ALPHA, "float")
    steer = _get(rec, RecommendedKey.STEER_LAYERS, "int_list") or []
    # The report names the pack's fields as the pack does (contract.pack).
    info = {
        "kind": "steering pack", "path": str(path), "sha256": file_sha256(path),
        PackKey.MODE: _get(meta, PackKey.MODE, "str"),
        PackKey.FORMAT_VERSION: _get(meta, PackKey.FORMAT_VERSION, "int"),
        PackKey.NUM_LAYERS: pack.num_layers, PackKey.HIDDEN_SIZE: pack.hidden_size,
        PackKey.SITE: _get(meta, PackKey.SITE, "str"),
        PackKey.RECOMMENDED: {k: rec.get(k) for k in (RecommendedKey.GATE, RecommendedKey.GATE_LAYER,
                                                      RecommendedKey.STEER_LAYERS, RecommendedKey.ALPHA,
                                                      RecommendedKey.BIAS_RULE)},
        RecommendedKey.GATE_LAYER: gate,
        "bias": {"paper": _get(stats, LayerStatsKey.bias("paper"), "float"),
                 "fpr": _get(stats, LayerStatsKey.bias("fpr"), "float"),
                 "rule": _get(rec, RecommendedKey.BIAS_RULE, "str")},
        "gate_val": {k: _get(stats, k, "float") for k in (LayerStatsKey.TARGET_VAL_ACCURACY, LayerStatsKey.VAL_TPR,
                                                          LayerStatsKey.VAL_FPR)},
        "vector_norms": {int(l): float(np.linalg.norm(alpha * pack.aligned_srv[int(l)]))
                         for l in steer if alpha is not None and 0 <= l < pack.num_layers},
        "fingerprints": {k: _get(_get(meta, k, "dict"), ModelInfoKey.FINGERPRINT, "str")
                         for k in (PackKey.TARGET, PackKey.ALIGNED)},
        PackKey.PROMPTS: {_short(k): {"count": _get(v, "count", "int")}
                          for k, v in (_get(meta, PackKey.PROMPTS, "dict") or {}).items()},
    }
    if pack.has_linear_gate:
        gate_meta = _get(meta, PackKey.GATE, "dict") or {}
        info["linear_gate"] = {k: gate_meta.get(k) for k in (GateKey.LAYERS, GateKey.TOKENS, GateKey.NORMALIZE,
                                                             GateKey.BIAS, "C", PackKey.MAX_FPR, "max_fpr_borderline")}
        info["linear_gate"]["heldout"] = _get(gate_meta, "heldout", "dict") or {}
        info["linear_gate"]["weight_norms"] = [float(np.linalg.norm(w)) for w in pack.gate_weight]
        info["linear_gate"][GateKey.VERSION] = gate_meta.get(GateKey.VERSION)
        if pack.gate_max_weight is not None:  # the pooled gate (version 3, issue 18): its max term's weights
            info["linear_gate"]["max_weight_norms"] = [float(np.linalg.norm(w)) for w in pack.gate_max_weight]
    return info


# --- graphs ----------------------------------------------------------------------------------------------------------
def _graph_facts(summary) -> dict:
    """Steering facts read from the graph itself (node names, constants, interface), independent of the metadata;
    named as the manifest names the same facts, so that the two compare key by key."""
    facts = steering_facts(summary)
    interface = GATE_IN in summary.inputs and {GATE_OUT, SCORE_OUT} <= set(summary.outputs)
    impl = "function" if any(n.domain and n.domain not in ("", "ai.onnx", "com.microsoft") and
                             (n.op_type in OP_TYPES) for n in summary.nodes) else \
        ("inline" if facts.gate_layers or facts.steer_layers else None)
    ops = Counter(n.op_type for n in summary.nodes)
    quantized = Counter()
    for node in summary.nodes:
        if node.op_type in QUANTIZED_OPS:
            bits, block = node.attributes.get("bits"), node.attributes.get("block_size")
            quantized[(node.op_type, int(bits.values[0]) if bits is not None and bits.tag == "i" else 4,
                       int(block.values[0]) if block is not None and block.tag == "i" else 0)] += 1
    fused = sorted(op for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                                 "MultiHeadAttention", "SimplifiedLayerNormalization") if ops.get(op))
    return {
        "steered": bool(interface and facts.gate_layers and facts.steer_layers),
        "interface": interface,
        Key.GATE_LAYER: facts.gate_layer, "gate_layers": facts.gate_layers, "gates": facts.gates,
        Key.STEER_LAYERS: facts.steer_layers, Key.STEER_IMPL: impl, Key.BIAS: facts.bias,
        "vector_norms": facts.vector_norms, "plugin_attributes": facts.plugin_versions,
        "shift_modes": facts.shift_modes,
        "inputs": summary.inputs, "outputs": summary.outputs,
        "weights": {"quantized_nodes": [{"op": op, "bits": bits, "block_size": block, "count": count}
                                        for (op, bits, block), count in sorted(quantized.items())],
                    "float_matmuls": ops.get("MatMul", 0), "fused_ops": fused},
        "self_test_constants": constant_problems(facts) if facts.gate_layers or facts.steer_layers else [],
    }


def _metadata(summary) -> dict:
    facts = {}
    for key, value in summary.metadata.items():
        if key.startswith(METADATA_PREFIX):
            try:
                facts[key[len(METADATA_PREFIX):]] = schema.loads(value, key)
            except AlignerError:
                facts[key[len(METADATA_PREFIX):]] = value
    return facts


def describe_onnx(path: Path) -> dict:
    summary = read_graph_summary(path)  # malformed: one AlignerError
    metadata = _metadata(summary)
    graph = _graph_facts(summary)
    info = {"kind": "onnx", "path": str(path), "graph": graph, "metadata": metadata}
    if metadata:
        info["disagreements"] = disagreements(metadata, graph, "metadata")
        info["metadata_matches_graph"] = not info["disagreements"]
    return info


def disagreements(claims: dict, graph: dict, source: str) -> list[str]:
    """What ``claims`` (the manifest, or the graph's metadata) says about the steering that the graph does not do."""
    out = []
    gate = _get(claims, Key.GATE, "dict")
    claimed_gates = _get(gate, GateKey.LAYERS, "int_list")
    if claimed_gates is None and _get(claims, Key.GATE_LAYER, "int") is not None:  # format 1
        claimed_gates = [claims[Key.GATE_LAYER]]
    if claimed_gates is not None and sorted(claimed_gates) != graph["gate_layers"]:
        out.append(f"the {source} says gate layers {_fmt(claimed_gates)}, the graph's SteerGate nodes sit on "
                   f"{_fmt(graph['gate_layers'])}")
    claimed_steer = _get(claims, Key.STEER_LAYERS, "int_list")
    if claimed_steer is not None and sorted(claimed_steer) != graph[Key.STEER_LAYERS]:
        out.append(f"the {source} says steer layers {_fmt(claimed_steer)}, the graph's SteerShift nodes sit on "
                   f"{_fmt(graph[Key.STEER_LAYERS])}")
    bias = _gate_fact(claims, GateKey.BIAS, Key.BIAS, "float")
    if bias is not None and graph[Key.BIAS] is not None and not (math.isfinite(graph[Key.BIAS])
                                                               and _close(bias, graph[Key.BIAS])):
        out.append(f"the {source} says gate bias {_fmt(bias)}, the graph's gate has bias {_fmt(graph[Key.BIAS])}")
    alpha = _get(claims, Key.ALPHA, "float")
    if alpha is not None:
        # the exporter writes alpha times a unit safety vector (aligner_export.pack.SteeringPack.steer_config)
        off = {l: n for l, n in graph["vector_norms"].items() if not (math.isfinite(n) and _close(n, alpha, 1e-3))}
        if off:
            layer = next(iter(off))
            out.append(f"the {source} says alpha {_fmt(alpha)}, but the graph's steering vector"
                       f"{'s' if len(off) > 1 else ''} of layer{'s' if len(off) > 1 else ''} "
                       f"{_fmt(list(off)[:8])} {'have norms' if len(off) > 1 else 'has norm'} "
                       f"{_fmt(off[layer])}{'…' if len(off) > 1 else ''} (the exporter writes alpha × a unit vector)")
    if claimed_steer is not None and graph["shift_modes"]:
        claimed_mode = _get(claims, Key.SHIFT_MODE, "str") or DEFAULT_SHIFT_MODE  # absent: every export before issue 17
        off = sorted(l for l, mode in graph["shift_modes"].items() if mode != claimed_mode)
        if off:
            plural = len(off) > 1
            out.append(f"the {source} says shift mode {claimed_mode}, the graph's SteerShift of layer"
                       f"{'s' if plural else ''} {_fmt(off[:8])} {'shift' if plural else 'shifts'} "
                       f"{graph['shift_modes'][off[0]]}")
    if claims.get(Key.FORMAT_VERSION) is not None and claimed_steer and not graph["steered"]:
        out.append(f"the {source} describes a steered export, the graph has no complete steering interface")
    return out


def _gate_fact(claims: dict, gate_key: str, legacy_key: str, kind: str):
    """A fact of the gate: from the ``gate`` object (formats 2 and 3), else the top-level copy of formats 1 and 2."""
    value = _get(_get(claims, Key.GATE, "dict"), gate_key, kind)
    return value if value is not None else _get(claims, legacy_key, kind)


def _key_fact_disagreements(manifest: dict, metadata: dict) -> list[str]:
    out = []
    for key in KEY_FACTS:
        if key in manifest and key in metadata and not same_fact(manifest[key], metadata[key]):
            out.append(f"the manifest and the graph's metadata disagree on {key}: {_fmt(manifest[key])} vs "
                       f"{_fmt(metadata[key])}")
    return out


def _read_manifest(path: Path) -> tuple[object, str]:
    file = path / MANIFEST_FILE
    raw = schema.read_bounded(file, MAX_MANIFEST_BYTES, "the manifest")
    return schema.loads(raw, f"the manifest {file}"), hashlib.sha256(raw).hexdigest()


def _validation(manifest: dict) -> dict:
    validation = manifest.get(Key.VALIDATION)
    if validation is None:
        return {"state": "not run"}
    passed = _get(validation, "passed", "bool") if isinstance(validation, dict) else None
    state = "passed" if passed is True else "FAILED" if passed is False else "unreadable"
    return {"state": state, "record": validation if isinstance(validation, dict) else None}


def describe_export_dir(path: Path, trusted_keys=None, expect_sha256: str | None = None) -> dict:
    manifest, digest = _read_manifest(path)
    if not isinstance(manifest, dict):
        raise AlignerError(f"the manifest {path / MANIFEST_FILE} is not a JSON object")
    info: dict = {"kind": "export directory", "path": str(path), "manifest_sha256": digest, "manifest": manifest,
                  "graph": None, "metadata": {}, "warnings": []}
    try:
        load_export(path)
        info["load_check"] = {"passed": True, "detail": "manifest, key facts, every digest and the weights agree"}
    except AlignerError as exc:
        info["load_check"] = {"passed": False, "detail": str(exc)}
    info["signature"] = _signature_check(path, digest, trusted_keys, expect_sha256)
    model = path / MODEL_FILE
    if model.is_file():
        try:
            summary = read_graph_summary(model)
        except AlignerError as exc:
            info["warnings"].append(str(exc))
        else:
            info["graph"] = _graph_facts(summary)
            info["metadata"] = _metadata(summary)
    else:
        info["warnings"].append(f"the export has no {MODEL_FILE}")
    graph = info["graph"]
    if graph is not None:
        info["warnings"] += disagreements(manifest, graph, "manifest")
        info["warnings"] += _key_fact_disagreements(manifest, info["metadata"])
        info["warnings"] += [f"steering self-test: {p}" for p in graph["self_test_constants"]]
    info["validation"] = _validation(manifest)
    if info["validation"]["state"] != "passed":
        info["warnings"].append(f"validation against the PyTorch reference: {info['validation']['state']} "
                                f"(aligner-run refuses such an export)")
    refused = not info["load_check"]["passed"] or info["signature"]["state"] in ("REFUSED",)
    info["verdict"] = "REFUSED" if refused else ("loads, with warnings" if info["warnings"] else "loads")
    return info


def _signature_check(path: Path, digest: str, trusted_keys, expect_sha256) -> dict:
    try:
        result = signing.check_export(path, manifest_sha256=digest, trusted_keys=trusted_keys,
                                      expect_sha256=expect_sha256)
    except AlignerError as exc:
        return {"state": "REFUSED", "detail": str(exc)}
    return {"state": result.state, "detail": result.detail}


def describe_engine(stamp_path: Path) -> dict:
    if not stamp_path.is_file():
        raise AlignerError(f"no engine stamp {stamp_path.name} beside the engine in {stamp_path.parent}")
    raw = schema.read_bounded(stamp_path, MAX_STAMP_BYTES, "the engine stamp")
    stamp = schema.loads(raw, str(stamp_path))
    if not isinstance(stamp, dict):
        raise AlignerError(f"{stamp_path}: not a JSON object")
    engine = _get(stamp, StampKey.ENGINE_FILE, "str") or "?"
    return {"kind": "tensorrt engine", "path": str(stamp_path.parent / engine) if "/" not in engine else engine,
            "stamp": stamp}


# --- text ------------------------------------------------------------------------------------------------------------
def _weights_line(recorded, graph) -> str:
    """The manifest's ``weights`` (or fp32/fp16 from an older manifest's dtype) and what the graph holds."""
    if isinstance(recorded, dict):
        text = _short(recorded.get("format", "?"))
        if recorded.get("bits"):
            text += (f" (weight-only {_short(recorded.get('op'))}, block {_short(recorded.get('block_size'))}, "
                     f"{_short(recorded.get('method'))}, accuracy level {_short(recorded.get('accuracy_level'))})")
    else:
        text = "not recorded (float weights in the graph's dtype)"
    if graph is not None and graph.get("weights"):
        facts = graph["weights"]
        nodes = ", ".join(f"{q['count']} {q['op']} int{q['bits']}" for q in facts["quantized_nodes"])
        text += f"; graph: {nodes or 'no quantized nodes'}, {facts['float_matmuls']} float MatMul"
        if facts["fused_ops"]:
            text += f", fused {', '.join(facts['fused_ops'])}"
    return text


def _render_pack(info: dict, lines: list[str]) -> None:
    rec = info[PackKey.RECOMMENDED]
    lines += [f"  format {info[PackKey.FORMAT_VERSION]}, mode {_short(info[PackKey.MODE])}, {info[PackKey.NUM_LAYERS]} "
              f"layers x {info[PackKey.HIDDEN_SIZE]} hidden, site {_short(info[PackKey.SITE])}",
              f"  recommended: {_short(rec.get(RecommendedKey.GATE) or 'paper')} gate; paper gate layer "
              f"{_fmt(rec.get(RecommendedKey.GATE_LAYER))}, steer layers {_fmt(rec.get(RecommendedKey.STEER_LAYERS))}, "
              f"alpha {_fmt(rec.get(RecommendedKey.ALPHA))}, bias rule {_fmt(rec.get(RecommendedKey.BIAS_RULE))}, "
              f"shift mode {_short(rec.get(RecommendedKey.SHIFT_MODE) or DEFAULT_SHIFT_MODE)}",
              f"  gate bias: paper {_fmt(info['bias']['paper'])}, fpr {_fmt(info['bias']['fpr'])}; "
              f"validation {_fmt(info['gate_val'])}",
              f"  vector norms (alpha * ssv): {_fmt(info['vector_norms'])}",
              f"  fingerprints: target {_short(info['fingerprints']['target'])}, aligned "
              f"{_short(info['fingerprints']['aligned'])}",
              f"  sha256 {info['sha256']}"]
    linear = info.get("linear_gate")
    if linear:
        held = linear.get("heldout") or {}
        pooled = linear.get("max_weight_norms")
        lines.insert(3, f"  {'pooled' if pooled is not None else 'linear'} gate: layers "
                        f"{_fmt(linear.get(GateKey.LAYERS))}, last {_fmt(linear.get(GateKey.TOKENS))} tokens"
                        f"{', unit-normalised' if linear.get(GateKey.NORMALIZE) is True else ''}, |w_l| "
                        f"{_fmt(linear['weight_norms'])}"
                        f"{f', max over the prompt |m_l| {_fmt(pooled)}' if pooled is not None else ''}, bias "
                        f"{_fmt(linear.get(GateKey.BIAS))}; held-out FPR generic "
                        f"{_fmt(held.get('fpr_harmless'))}, borderline {_fmt(held.get('fpr_borderline'))}; "
                        f"leave-one-source-out TPR {_fmt(held.get('loso_mean_tpr'))}")


def _render_graph(graph: dict, lines: list[str]) -> None:
    lines.append(f"  steered: {'yes' if graph['steered'] else 'NO (no steering nodes/interface)'}")
    if graph["steered"]:
        last = graph["gates"][graph[Key.GATE_LAYER]]
        lines += [f"  steering sites: SteerShift after layers {_fmt(graph[Key.STEER_LAYERS])}; SteerGate "
                  f"v{_fmt(last['version'] or '?')} at layer{'s' if len(graph['gate_layers']) > 1 else ''} "
                  f"{_fmt(graph['gate_layers'])} ({graph[Key.STEER_IMPL]}; plugin "
                  f"{_fmt(graph['plugin_attributes']) if graph['plugin_attributes'] else '-'})",
                  f"  gate (graph): bias {_fmt(graph[Key.BIAS])}, last {last['tokens']} token(s)"
                  f"{', unit-normalised' if last['normalize'] else ''}, |weight| per layer "
                  f"{_fmt({l: g['weight_norm'] for l, g in graph['gates'].items()})}"
                  + (f", |max_weight| per layer {_fmt({l: g['max_weight_norm'] for l, g in graph['gates'].items()})}"
                     if any(g.get('max_weight_norm') is not None for g in graph['gates'].values()) else ""),
                  f"  vector norms (alpha * ssv): {_fmt(graph['vector_norms'])}",
                  f"  shift (graph): {_shift_line(graph['shift_modes'])}"]
    if graph["gate_layers"] and two_pass_prefill(graph[Key.STEER_LAYERS], graph["gate_layers"]):
        lines.append("  two-pass prefill: a steered layer lies below the last gate layer (§5 runtime protocol)")


# What each registered shift mode does (contract.SHIFT_MODES).
SHIFT_MEANINGS = {mode.name: f"SteerShift v{version}, {mode.summary}" for version, mode in SHIFT_MODES.items()}


def _shift_line(modes: dict) -> str:
    """One mode for every steered layer (what the exporter writes), or the modes per layer."""
    kinds = sorted(set(modes.values()))
    if len(kinds) == 1:
        return f"{kinds[0]} ({SHIFT_MEANINGS.get(kinds[0], 'unknown version')})"
    return "per layer " + _fmt(modes)


def _render_facts(facts: dict, graph, validation: dict, lines: list[str]) -> None:
    bias = _gate_fact(facts, GateKey.BIAS, Key.BIAS, "float")
    rule = _gate_fact(facts, GateKey.RULE, Key.BIAS_RULE, "str")
    lines += [f"  alpha {_fmt(facts.get(Key.ALPHA))}, bias {_fmt(bias)} ({_fmt(rule)}), "
              f"dtype {_fmt(facts.get(Key.DTYPE))}, opset {_fmt(facts.get(Key.OPSET))}, "
              f"site {_fmt(facts.get(Key.SITE))}",
              f"  weights: {_weights_line(facts.get(Key.WEIGHTS), graph)}",
              f"  fingerprints: target {_fmt(facts.get(Key.TARGET_FINGERPRINT))}, pack sha256 "
              f"{_fmt(facts.get(Key.PACK_SHA256))}"]
    record = validation.get("record") or {}
    state = validation["state"]
    if state == "not run":
        lines.append("  validation: not run (--no-validate)")
    else:
        lines.append(f"  validation: {state}, max |logit diff| prefill {_fmt(record.get('prefill_max_abs_diff'))}, "
                     f"decode {_fmt(record.get('decode_max_abs_diff'))} (tolerance {_fmt(record.get('tolerance'))}); "
                     f"gates {_fmt(record.get('gates'))}")
        quantized = _get(record, "weights", "dict")
        if quantized:
            lines.append(f"  {_fmt(quantized.get('format'))} vs the float graph: gates agree on "
                         f"{_fmt(quantized.get('gates_agree'))}/{_fmt(quantized.get('prompts'))} prompts "
                         f"({len(quantized.get('gate_disagreements') or [])} disagreements), logit rel. RMS error "
                         f"mean {_fmt(quantized.get('logit_rel_rms_mean'))} (tolerance "
                         f"{_fmt(quantized.get('logit_rel_rms_tolerance'))}), greedy top-1 agreement "
                         f"{_fmt(quantized.get('top1_agreement'))}")
    mm = _get(facts, Key.MULTIMODAL, "dict")
    if mm:
        pre = _get(mm, "preprocessing", "dict") or {}
        anyres = _get(mm, "anyres", "dict")
        if anyres:  # LLaVA-NeXT: the base-image steps sit under "base"
            tile = _get(pre, "tile_size", "list") or ["?", "?"]
            tile = tile if len(tile) == 2 else ["?", "?"]
            what = (f"{_fmt(anyres.get('features_per_tile'))} features per {_fmt(tile[1])}x{_fmt(tile[0])} tile, "
                    f"any-resolution grids {_fmt(pre.get('grid_pinpoints'))} + base image + newlines")
            pre = _get(pre, "base", "dict") or {}
        else:
            size = _get(pre, "output_size", "list") or ["?", "?"]
            size = size if len(size) == 2 else ["?", "?"]
            what = f"{_fmt(mm.get('image_seq_length'))} features per {_fmt(size[1])}x{_fmt(size[0])} image"
        lines += [f"  vision-language ({_fmt(mm.get('architecture'))}): {_fmt(mm.get('vision_model'))} -> {what}, "
                  f"{_fmt(mm.get('embed_model'))}; image token {_fmt(mm.get('image_token'))} (id "
                  f"{_fmt(mm.get('image_token_id'))}, {_fmt(mm.get('placement'))} placement)",
                  f"  preprocessing: resize {_fmt(pre.get('resize_rule'))} "
                  f"{_fmt(pre.get('resize_shortest_edge') or pre.get('resize_height_width'))} "
                  f"({_fmt(pre.get('resample'))}), crop "
                  f"{_fmt(pre.get('crop_height_width')) if pre.get('do_center_crop') else 'none'}, "
                  f"mean {_fmt(pre.get('image_mean'))}, std {_fmt(pre.get('image_std'))}"]
        rounds = _get(record, "rounds", "list") or []
        graphs = next((r["graphs"] for r in rounds if isinstance(r, dict) and "graphs" in r), None)
        if graphs:
            lines.append(f"  vision/embedding graphs vs PyTorch: {_fmt(graphs)}")


def render(info: dict) -> str:
    lines = [f"{info['kind']}: {_short(info['path'], 1000)}"]
    kind = info["kind"]
    if kind == "steering pack":
        _render_pack(info, lines)
        return "\n".join(lines)
    if kind == "tensorrt engine":
        lines += [f"  {_short(k)}: {_fmt(v)}" for k, v in sorted(info["stamp"].items())]
        return "\n".join(lines)
    graph = info.get("graph")
    if kind == "export directory":
        check = info["load_check"]
        lines.append(f"  verdict: {info['verdict']}")
        lines.append(f"  load check (manifest, key facts, digests, weights): "
                     f"{'passed' if check['passed'] else 'REFUSED: ' + _short(check['detail'], 400)}")
        signature = info["signature"]
        lines.append(f"  signature: {signature['state']}" + (f" ({_short(signature['detail'], 400)})"
                                                             if signature.get("detail") else ""))
        lines.append(f"  manifest sha256 {info['manifest_sha256']}")
    if graph is not None:
        _render_graph(graph, lines)
    meta = info.get("metadata") or {}
    manifest = info.get("manifest") or {}
    facts = {**meta, **manifest}
    if facts:
        validation = info.get("validation") or _validation(facts)
        _render_facts(facts, graph, validation, lines)
    else:
        lines.append("  no inferaligner metadata")
    warnings = list(info.get("warnings") or ())
    if kind == "onnx":
        warnings += info.get("disagreements") or []
        if graph is not None:
            warnings += [f"steering self-test: {p}" for p in graph["self_test_constants"]]
    lines += [f"  WARNING: {_short(w, 400)}" for w in warnings]
    return "\n".join(lines)
