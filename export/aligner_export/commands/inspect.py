"""``aligner-export inspect PATH``: a steering pack, an export directory, a bare ``.onnx`` file or a TensorRT engine.

Prints the steering sites and the gate layer, alpha and the bias, vector norms, fingerprints, the validation result
and whether the graph is steered at all. It reads metadata and graphs only: no torch import (STYLE.md), and the
graph is loaded without its external weight files.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligner_runtime.contract import (DOMAIN, GATE_IN, GATE_OUT, MANIFEST_FILE, MODEL_FILE, SCORE_OUT, STAMP_FILE,
                                      STEER_GATE, STEER_SHIFT, node_name, parse_node_name, two_pass_prefill)
from aligner_runtime.errors import AlignerError


def configure(parser) -> None:
    parser.add_argument("path", help="a steering pack (.safetensors), an export directory, a .onnx file or an engine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise AlignerError(f"not found: {path}")
    info = describe(path)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        print(render(info))
    return 0


def describe(path: Path) -> dict:
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return describe_export_dir(path)
        if (path / STAMP_FILE).is_file():
            return describe_engine(path / STAMP_FILE)
        raise AlignerError(f"{path}: neither an export directory ({MANIFEST_FILE}) nor an engine directory "
                           f"({STAMP_FILE})")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return describe_pack(path)
    if suffix == ".onnx":
        return describe_onnx(path)
    if suffix in (".engine", ".plan", ".trt") or path.name == STAMP_FILE:
        return describe_engine(path if path.name == STAMP_FILE else path.parent / STAMP_FILE)
    raise AlignerError(f"{path}: unknown kind of file (expected .safetensors, .onnx, an engine or a directory)")


def describe_pack(path: Path) -> dict:
    import numpy as np

    from aligner_export.pack import file_sha256, load_pack

    pack = load_pack(path)
    rec = pack.recommended
    gate = int(rec["gate_layer"])
    stats = pack.layer_stats(gate)
    info = {
        "kind": "steering pack", "path": str(path), "sha256": file_sha256(path), "mode": pack.mode,
        "format_version": pack.meta["format_version"],
        "num_layers": pack.num_layers, "hidden_size": pack.hidden_size, "site": pack.meta.get("site"),
        "recommended": rec, "gate_layer": gate,
        "bias": {"paper": stats["bias_paper"], "fpr": stats["bias_fpr"], "rule": rec["bias_rule"]},
        "gate_val": {k: stats.get(k) for k in ("target_val_accuracy", "val_tpr", "val_fpr")},
        "vector_norms": {int(l): float(np.linalg.norm(float(rec["alpha"]) * pack.aligned_srv[int(l)]))
                         for l in rec["steer_layers"]},
        "fingerprints": {"target": (pack.meta.get("target") or {}).get("fingerprint"),
                         "aligned": (pack.meta.get("aligned") or {}).get("fingerprint")},
        "prompts": {k: {"count": v.get("count")} for k, v in (pack.meta.get("prompts") or {}).items()},
    }
    if pack.has_linear_gate:
        meta = pack.meta["gate"]
        info["linear_gate"] = {k: meta.get(k) for k in ("layers", "tokens", "normalize", "bias", "C", "max_fpr",
                                                        "max_fpr_borderline", "heldout")}
        info["linear_gate"]["weight_norms"] = [float(np.linalg.norm(w)) for w in pack.gate_weight]
    return info


def _node_constants(model, name: str) -> dict:
    """A steering node's constants: its attributes (function form) or its inlined body's Constants ``{name}/{attr}``."""
    from onnx import helper, numpy_helper

    def value(attribute):
        value = helper.get_attribute_value(attribute)
        return numpy_helper.to_array(value) if hasattr(value, "dims") else value

    for node in model.graph.node:
        if node.name == name:
            return {a.name: value(a) for a in node.attribute if a.name != "plugin_namespace"}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.name.startswith(name + "/") and node.output[0].startswith(name + "/"):
            found[node.output[0][len(name) + 1:]] = value(node.attribute[0])
    return found


def _graph_facts(model) -> dict:
    """Steering facts read from the graph itself (nodes, attributes, interface), independent of the metadata."""
    import numpy as np

    gate_layers, shift_layers = set(), set()
    for node in model.graph.node:
        parsed = parse_node_name(node.name)
        if parsed is not None:
            (gate_layers if parsed[1] == STEER_GATE else shift_layers).add(parsed[0])
    gates, norms, plugin = {}, {}, set()
    for layer in sorted(gate_layers):
        constants = _node_constants(model, node_name(layer, STEER_GATE))
        weight = constants.get("weight", constants.get("direction"))
        gates[layer] = {"version": 2 if "weight" in constants else 1,
                        "weight_norm": float(np.linalg.norm(weight)) if weight is not None else None,
                        "bias": float(constants["bias"]) if "bias" in constants else None,
                        "tokens": int(constants.get("tokens", 1)), "normalize": bool(constants.get("normalize", 0))}
        if "plugin_version" in constants:
            plugin.add(f"SteerGate/{constants['plugin_version'].decode()}")
    for layer in sorted(shift_layers):
        constants = _node_constants(model, node_name(layer, STEER_SHIFT))
        if "vector" in constants:
            norms[layer] = float(np.linalg.norm(constants["vector"]))
        if "plugin_version" in constants:
            plugin.add(f"SteerShift/{constants['plugin_version'].decode()}")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    interface = GATE_IN in inputs and {GATE_OUT, SCORE_OUT} <= set(outputs)
    impl = "function" if any(n.domain == DOMAIN for n in model.graph.node) else \
        ("inline" if gate_layers or shift_layers else None)
    last = max(gate_layers) if gate_layers else None
    return {
        "steered": bool(interface and gate_layers and shift_layers),
        "gate_layer": last, "gate_layers": sorted(gate_layers), "gates": gates,
        "steer_layers": sorted(shift_layers), "steer_impl": impl,
        "bias": gates[last]["bias"] if last is not None else None,
        "vector_norms": dict(sorted(norms.items())),
        "plugin_attributes": sorted(plugin),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": inputs, "outputs": outputs,
        "weights": _weight_facts(model),
    }


def _weight_facts(model) -> dict:
    """The weight format as the graph itself shows it: quantized MatMulNBits nodes (bits, block size, count) and
    the fused ORT operators present (issue 11)."""
    from collections import Counter

    from onnx import helper

    ops = Counter(n.op_type for n in model.graph.node)
    quantized = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            quantized[(node.op_type, int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)))] += 1
    fused = sorted(op for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                                 "MultiHeadAttention", "SimplifiedLayerNormalization") if ops.get(op))
    return {"quantized_nodes": [{"op": op, "bits": bits, "block_size": block, "count": count}
                                for (op, bits, block), count in sorted(quantized.items())],
            "float_matmuls": ops.get("MatMul", 0), "fused_ops": fused}


def describe_onnx(path: Path) -> dict:
    import onnx

    from aligner_export.graph.manifest import read_metadata

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise AlignerError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    metadata = read_metadata(model)
    graph = _graph_facts(model)
    info = {"kind": "onnx", "path": str(path), "graph": graph, "metadata": metadata}
    if metadata:
        info["metadata_matches_graph"] = (metadata.get("steer_layers") == graph["steer_layers"]
                                          and metadata.get("gate_layer") == graph["gate_layer"])
    return info


def describe_export_dir(path: Path) -> dict:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    info = describe_onnx(path / MODEL_FILE) if (path / MODEL_FILE).is_file() else {"graph": None}
    info.update(kind="export directory", path=str(path), manifest=manifest)
    return info


def describe_engine(stamp_path: Path) -> dict:
    if not stamp_path.is_file():
        raise AlignerError(f"no engine stamp {stamp_path.name} beside the engine in {stamp_path.parent}")
    try:
        stamp = json.loads(stamp_path.read_text())
    except json.JSONDecodeError:
        raise AlignerError(f"{stamp_path}: not valid JSON") from None
    return {"kind": "tensorrt engine", "path": str(stamp_path.parent / stamp.get("engine_file", "?")),
            "stamp": stamp}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _weights_line(recorded, graph) -> str:
    """The manifest's ``weights`` (or fp32/fp16 from an older manifest's dtype) and what the graph holds."""
    if isinstance(recorded, dict):
        text = recorded.get("format", "?")
        if recorded.get("bits"):
            text += (f" (weight-only {recorded.get('op')}, block {recorded.get('block_size')}, "
                     f"{recorded.get('method')}, accuracy level {recorded.get('accuracy_level')})")
    else:
        text = "not recorded (float weights in the graph's dtype)"
    if graph is not None and graph.get("weights"):
        facts = graph["weights"]
        nodes = ", ".join(f"{q['count']} {q['op']} int{q['bits']}" for q in facts["quantized_nodes"])
        text += f"; graph: {nodes or 'no quantized nodes'}, {facts['float_matmuls']} float MatMul"
        if facts["fused_ops"]:
            text += f", fused {', '.join(facts['fused_ops'])}"
    return text


def render(info: dict) -> str:
    lines = [f"{info['kind']}: {info['path']}"]
    kind = info["kind"]
    if kind == "steering pack":
        rec = info["recommended"]
        lines += [f"  format {info['format_version']}, mode {info['mode']}, {info['num_layers']} layers x "
                  f"{info['hidden_size']} hidden, site {info['site']}",
                  f"  recommended: {rec.get('gate', 'paper')} gate; paper gate layer {rec['gate_layer']}, steer layers "
                  f"{_fmt(rec['steer_layers'])}, alpha {_fmt(float(rec['alpha']))}, bias rule {rec['bias_rule']}",
                  f"  gate bias: paper {_fmt(info['bias']['paper'])}, fpr {_fmt(info['bias']['fpr'])}; "
                  f"validation {_fmt(info['gate_val'])}",
                  f"  vector norms (alpha * ssv): {_fmt(info['vector_norms'])}",
                  f"  fingerprints: target {info['fingerprints']['target']}, aligned {info['fingerprints']['aligned']}",
                  f"  sha256 {info['sha256']}"]
        linear = info.get("linear_gate")
        if linear:
            held = linear.get("heldout") or {}
            lines.insert(3, f"  linear gate: layers {_fmt(linear['layers'])}, last {linear['tokens']} tokens"
                            f"{', unit-normalised' if linear['normalize'] else ''}, |w_l| "
                            f"{_fmt(linear['weight_norms'])}, bias {_fmt(linear['bias'])}; held-out FPR generic "
                            f"{_fmt(held.get('fpr_harmless'))}, borderline {_fmt(held.get('fpr_borderline'))}; "
                            f"leave-one-source-out TPR {_fmt(held.get('loso_mean_tpr'))}")
        return "\n".join(lines)
    if kind == "tensorrt engine":
        lines += [f"  {k}: {_fmt(v)}" for k, v in sorted(info["stamp"].items())]
        return "\n".join(lines)
    graph, meta = info.get("graph"), info.get("metadata") or {}
    manifest = info.get("manifest") or {}
    facts = {**meta, **manifest}
    if graph is not None:
        lines.append(f"  steered: {'yes' if graph['steered'] else 'NO (no steering nodes/interface)'}")
        if graph["steered"]:
            last = graph["gates"][graph["gate_layer"]]
            lines += [f"  steering sites: SteerShift after layers {_fmt(graph['steer_layers'])}; SteerGate "
                      f"v{last['version']} at layer{'s' if len(graph['gate_layers']) > 1 else ''} "
                      f"{_fmt(graph['gate_layers'])} ({graph['steer_impl']}; plugin "
                      f"{_fmt(graph['plugin_attributes']) if graph['plugin_attributes'] else '-'})",
                      f"  gate (graph): bias {_fmt(graph['bias'])}, last {last['tokens']} token(s)"
                      f"{', unit-normalised' if last['normalize'] else ''}, |weight| per layer "
                      f"{_fmt({l: g['weight_norm'] for l, g in graph['gates'].items()})}",
                      f"  vector norms (alpha * ssv): {_fmt(graph['vector_norms'])}"]
        if graph["gate_layers"] and two_pass_prefill(graph["steer_layers"], graph["gate_layers"]):
            lines.append("  two-pass prefill: a steered layer lies below the last gate layer (§5 runtime protocol)")
    if facts:
        lines += [f"  alpha {_fmt(facts.get('alpha'))}, bias {_fmt(facts.get('bias'))} ({facts.get('bias_rule')}), "
                  f"dtype {facts.get('dtype')}, opset {facts.get('opset')}, site {facts.get('site')}",
                  f"  weights: {_weights_line(facts.get('weights'), graph)}",
                  f"  fingerprints: target {facts.get('target_fingerprint')}, pack sha256 {facts.get('pack_sha256')}"]
        validation = facts.get("validation")
        if validation:
            lines.append(f"  validation: passed, max |logit diff| prefill "
                         f"{_fmt(validation['prefill_max_abs_diff'])}, decode "
                         f"{_fmt(validation['decode_max_abs_diff'])} (tolerance {_fmt(validation['tolerance'])}); "
                         f"gates {_fmt(validation.get('gates'))}")
            quantized = validation.get("weights")
            if quantized:
                lines.append(f"  {quantized['format']} vs the float graph: gates agree on {quantized['gates_agree']}/"
                             f"{quantized['prompts']} prompts ({len(quantized['gate_disagreements'])} disagreements), "
                             f"logit rel. RMS error mean {_fmt(quantized['logit_rel_rms_mean'])} (tolerance "
                             f"{_fmt(quantized['logit_rel_rms_tolerance'])}), greedy top-1 agreement "
                             f"{_fmt(quantized['top1_agreement'])}")
        else:
            lines.append("  validation: not run (--no-validate)")
        mm = facts.get("multimodal")
        if mm:
            pre = mm.get("preprocessing", {})
            anyres = mm.get("anyres")
            if anyres:  # LLaVA-NeXT: the base-image steps sit under "base"
                tile = pre.get("tile_size") or ["?", "?"]
                what = (f"{anyres.get('features_per_tile')} features per {tile[1]}x{tile[0]} tile, any-resolution "
                        f"grids {_fmt(pre.get('grid_pinpoints'))} + base image + newlines")
                pre = pre.get("base", {})
            else:
                size = pre.get("output_size") or ["?", "?"]
                what = f"{mm.get('image_seq_length')} features per {size[1]}x{size[0]} image"
            lines += [f"  vision-language ({mm.get('architecture')}): {mm.get('vision_model')} -> {what}, "
                      f"{mm.get('embed_model')}; image token {mm.get('image_token')} (id {mm.get('image_token_id')}, "
                      f"{mm.get('placement')} placement)",
                      f"  preprocessing: resize {pre.get('resize_rule')} "
                      f"{pre.get('resize_shortest_edge') or pre.get('resize_height_width')} ({pre.get('resample')}), "
                      f"crop {_fmt(pre.get('crop_height_width')) if pre.get('do_center_crop') else 'none'}, "
                      f"mean {_fmt(pre.get('image_mean'))}, std {_fmt(pre.get('image_std'))}"]
            graphs = next((r["graphs"] for r in (validation or {}).get("rounds", []) if "graphs" in r), None)
            if graphs:
                lines.append(f"  vision/embedding graphs vs PyTorch: {_fmt(graphs)}")
    else:
        lines.append("  no inferaligner metadata")
    if info.get("metadata_matches_graph") is False:
        lines.append("  WARNING: the metadata and the graph disagree on the steering sites")
    return "\n".join(lines)
