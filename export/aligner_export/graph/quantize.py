"""Weight formats of an export (issue 11): ``fp32``, ``fp16``, and weight-only block-wise ``int8`` / ``int4``.

int8 and int4 are applied to the *steered* graph, after the rewrite, with ONNX Runtime's ``MatMulNBitsQuantizer``
(blocks of 32 along K; the kernels and block size the onnxruntime-genai builder emits for CPU). int8 rounds to
nearest, symmetric. int4 uses HQQ (half-quadratic quantization: per-block scale and float zero point optimised
against the weights, no calibration data; ``--quant-method rtn`` gives the builder's plain symmetric rounding),
then rounds to nearest whatever HQQ leaves (the LM head when it reads a shared matrix). Chosen by measurement
(docs/performance.md): on SmolLM2 the gate of an RTN int4 graph agreed with the float graph on 81% of the held-out
prompts, HQQ's on 100%, at the same decode speed. Only the model's own MatMuls with a constant weight become
``com.microsoft::MatMulNBits``:

- every steering node (``/model/layers.{l}/steer/*``, ``/model/steer/*``) is excluded by name, and in the function
  form the SteerGate/SteerShift bodies are model-local functions the quantizer does not enter; in the inline form
  their MatMul reads a ``Constant`` node, never an initializer, so it is not a candidate either. The gate's
  direction/weights, the shift vectors and the gate's arithmetic therefore stay float32 bit for bit
  (:func:`steering_constants_unchanged` checks it);
- activations stay in the graph's dtype (float32, or float16 with ``--dtype fp16``); ``accuracy_level`` 4 lets the
  CPU kernel compute int4 x int8 (what the builder chooses for CPU), 0 keeps float compute.

A tied embedding (the token-embedding ``Gather`` reads the same matrix as the LM head, directly or through a
``Transpose``, as the builder writes it) is re-pointed at the quantized LM head through
``com.microsoft::GatherBlockQuantized``: one copy of the matrix on disk, as the builder does.
"""

from __future__ import annotations

import warnings
import logging
import re
from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

from aligner_runtime.contract import INPUT_IDS, LOGITS, STEER_PREFIX
from aligner_runtime.errors import AlignerError
from aligner_runtime.contract.choices import GATE_PATH_BITS, QUANT_METHODS, WEIGHT_FORMATS, ZERO_POINTS

MS_DOMAIN = "com.microsoft"
_LAYER = re.compile(r"^/model/layers\.(\d+)/")
_GATE = re.compile(r"^/model/layers\.(\d+)/steer/SteerGate(/|$)")


@dataclass(frozen=True)
class WeightFormat:
    """How the MatMul weights are stored: ``bits`` None for float formats."""

    name: str
    bits: int | None = None
    block_size: int = 32
    accuracy_level: int = 4
    method: str = "rtn"  # rtn: round to nearest, symmetric; hqq: HQQ (asymmetric, float zero points)
    # hqq: how its float zero points reach the kernel: "exact" (split_float_zero_points: the fast kernel plus a
    # block-sum correction) or "kernel" (fold_float_zero_points: integer zero points, no extra node, not exact)
    zero_points: str = "exact"
    # int4: the bits of the MatMuls in the layers that feed the gate (0..g*, g* the deciding SteerGate's layer, read
    # from the graph), which decide what the gate reads; None quantises them like the rest.
    gate_path_bits: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def manifest(self) -> dict:
        """The manifest's ``weights`` object."""
        if not self.quantized:
            return {"format": self.name}
        return {"format": self.name, "op": "MatMulNBits", "bits": self.bits, "block_size": self.block_size,
                "method": self.method, "accuracy_level": self.accuracy_level,
                **({"zero_points": self.zero_points} if self.method == "hqq" else {}),
                **({"gate_path_bits": self.gate_path_bits} if self.gate_path_bits else {}),
                "quantizer": "onnxruntime.quantization.MatMulNBitsQuantizer"}


METHODS = QUANT_METHODS


def weight_format(name: str, accuracy_level: int | None = None, block_size: int | None = None,
                  method: str | None = None, zero_points: str | None = None,
                  gate_path_bits: int | None = None) -> WeightFormat:
    """The weight format of ``--weights NAME`` and its options. int4 defaults (docs/performance.md, issue 20): round
    to nearest, with the gate's path (the embedding and layers 0..g*) at 8 bits, so that the gate decides as the
    float graph's does and every MatMul is one kernel call; ``--quant-method hqq`` keeps HQQ's float zero points
    exactly (``exact``, a correction beside each MatMul: slower) or folds them into the kernel's integer ones
    (``kernel``)."""
    if name not in WEIGHT_FORMATS:
        raise AlignerError(f"unknown weight format '{name}': use one of {', '.join(WEIGHT_FORMATS)}")
    bits = {"int4": 4, "int8": 8}.get(name)
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise AlignerError(f"--block-size must be a power of two >= 16, got {block_size}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise AlignerError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    if method is not None and method not in METHODS:
        raise AlignerError(f"--quant-method must be one of {', '.join(METHODS)}")
    if method == "hqq" and bits != 4:
        raise AlignerError("--quant-method hqq is for --weights int4 (int8 rounds to nearest)")
    if zero_points is not None and (method != "hqq" or zero_points not in ZERO_POINTS):
        raise AlignerError(f"--zero-points ({', '.join(ZERO_POINTS)}) goes with --quant-method hqq")
    if gate_path_bits is not None and (bits != 4 or gate_path_bits not in GATE_PATH_BITS):
        raise AlignerError(f"--gate-path-bits ({', '.join(map(str, GATE_PATH_BITS))}) is for --weights int4")
    method = method or "rtn"
    if gate_path_bits is None:
        gate_path_bits = 8 if bits == 4 and method == "rtn" else None
    return WeightFormat(name, bits, block_size or 32, 4 if accuracy_level is None else accuracy_level, method,
                        zero_points or "exact", None if gate_path_bits == bits else gate_path_bits)


def is_steering_node(name: str) -> bool:
    return name.startswith(STEER_PREFIX) or "/steer/" in name


def all_node_names(graph) -> list[str]:
    """The names of ``graph``'s nodes and of the nodes of their subgraphs (an inlined SteerGate's If, issue 20: ONNX
    Runtime's quantizer walks subgraphs too, so what it must leave alone is named at every depth)."""
    names = []
    for node in graph.node:
        names.append(node.name)
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                names += all_node_names(attr.g)
            names += [n for g in attr.graphs for n in all_node_names(g)]
    return names


def gate_layer(model) -> int:
    """The layer of the graph's deciding SteerGate (the last of a chain): ``/model/layers.{g}/steer/SteerGate``,
    a node (function form) or the prefix of its inlined body."""
    layers = [int(m.group(1)) for n in model.graph.node if (m := _GATE.match(n.name))]
    if not layers:
        raise AlignerError("the graph has no SteerGate: there is no gate path to keep at higher precision")
    return max(layers)


def gate_path_nodes(model, layers: int) -> list[str]:
    """The MatMuls of decoder layers ``0..layers-1`` (``/model/layers.{l}/...``, the optimum and builder graphs'
    names) with a constant weight: everything quantisable that computes the residuals a gate at layer
    ``layers - 1`` reads."""
    inits = _initializers(model.graph)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not is_steering_node(n.name)
            and len(n.input) > 1 and n.input[1] in inits and (m := _LAYER.match(n.name)) and int(m.group(1)) < layers]


def quantize(model, fmt: WeightFormat):
    """Returns the ``onnx.ModelProto`` ``model`` with its MatMul weights in ``fmt`` (a quantized format)."""
    # deferred: ONNX Runtime's quantizer (and the torch it loads for HQQ) only when an export quantises
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if not fmt.quantized:
        raise AlignerError(f"{fmt.name} is not a quantized weight format")
    excluded = [name for name in all_node_names(model.graph) if is_steering_node(name)]
    rtn = DefaultWeightOnlyQuantConfig(block_size=fmt.block_size, is_symmetric=True,
                                       accuracy_level=fmt.accuracy_level, bits=fmt.bits)
    passes = [(rtn, excluded)]
    path = []
    if fmt.gate_path_bits and fmt.gate_path_bits != fmt.bits:
        # First, the gate's path at its own bits (round to nearest, symmetric: int8's gates agreed with the float
        # graph's on 134/134 held-out prompts on SmolLM2); the passes below find those nodes quantised and skip them.
        path = gate_path_nodes(model, gate_layer(model) + 1)
        wide = DefaultWeightOnlyQuantConfig(block_size=fmt.block_size, is_symmetric=True,
                                            accuracy_level=fmt.accuracy_level, bits=fmt.gate_path_bits)
        keep = set(path)
        passes.insert(0, (wide, [name for name in all_node_names(model.graph) if name not in keep]))
    if fmt.method == "hqq":
        # The LM head reads no residual the gate sees; it is rounded to nearest (symmetric, no zero points) so that
        # a tied embedding can share it (GatherBlockQuantized takes packed integer zero points only).
        producers = {o: n for n in model.graph.node for o in n.output}
        head = [n.name for n in model.graph.node if n.op_type == "MatMul" and
                n.output[0] in _logits_producers(model.graph, producers)]
        passes.insert(len(passes) - 1, (HQQWeightOnlyQuantConfig(block_size=fmt.block_size, bits=fmt.bits),
                                        excluded + head))
    # The fold fits the integer zero points to the original float weights (HQQ's own reconstruction would add its
    # error to the fold's); copies, since the quantizer replaces the initializers in place.
    originals = _matmul_weights(model, excluded + head + path) if fmt.method == "hqq" and \
        fmt.zero_points == "kernel" else None
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # ORT's quantizer wraps read-only weight arrays in torch tensors that it only reads; torch's warning about
            # non-writable arrays names ORT's code and is nothing a user can act on.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            for config, skip in passes:  # the RTN pass rounds what HQQ left (the LM head)
                quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=skip)
                quantizer.process()
                model = quantizer.model.model
    finally:
        logger.setLevel(level)
    count = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            count += 1
            if not any(a.name == "accuracy_level" for a in node.attribute):  # HQQ's nodes carry none
                node.attribute.append(helper.make_attribute("accuracy_level", fmt.accuracy_level))
    if count == 0:
        raise AlignerError("weight quantization found no MatMul with a constant weight to quantize")
    if fmt.zero_points == "kernel":
        fold_float_zero_points(model, originals)
    else:
        split_float_zero_points(model)
    if path:
        quantize_embedding(model, fmt.gate_path_bits, fmt.block_size)
    else:
        tie_embedding(model, fmt)
    return model


def split_float_zero_points(model) -> int:
    """HQQ writes float zero points, which ONNX Runtime's CPU kernel serves only by de-quantizing the whole weight
    on every call (17x slower than the packed path, measured on SmolLM2). The same product, exactly, is a
    MatMulNBits with the implicit zero point (``2^(bits-1)``) plus a per-block correction:

        x · ((q - z) s) = x · ((q - m) s) + Σ_blocks (Σ_{k in block} x_k) · ((m - z) s)

    i.e. the block sums of ``x`` (a MatMul with a 0/1 matrix ``[K, K/block]``) times a small float matrix
    ``[K/block, N]``, added to the fast kernel's output. Returns the number of nodes rewritten."""
    graph = model.graph
    inits = _initializers(graph)
    rewritten = 0
    index = 0
    shared_sums: dict[tuple[str, str], str] = {}
    while index < len(graph.node):
        node = graph.node[index]
        zero_name = node.input[3] if node.op_type == "MatMulNBits" and len(node.input) > 3 else ""
        zero = inits.get(zero_name)
        if not zero_name or zero is None or zero.data_type == 2:  # absent or packed uint8: the fast path already
            index += 1
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
        if k % block:
            index += 1
            continue
        blocks = k // block
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks)
        zeros = numpy_helper.to_array(zero).astype(np.float32).reshape(n, blocks)
        correction = ((2.0 ** (bits - 1) - zeros) * scales).T.astype(np.float32)  # [blocks, N]
        prefix = node.name
        corr_name = f"{prefix}/zero_point_correction"
        sums_name = f"/model/quantize/block_sums_K{k}_B{block}"  # [K, blocks] of 0/1, shared by equal shapes
        if sums_name not in inits:
            indicator = np.repeat(np.eye(blocks, dtype=np.float32), block, axis=0)
            inits[sums_name] = numpy_helper.from_array(indicator, sums_name)
            graph.initializer.append(inits[sums_name])
        graph.initializer.append(numpy_helper.from_array(correction, corr_name))
        x, y = node.input[0], node.output[0]
        main = f"{prefix}/main_output"
        fast = helper.make_node("MatMulNBits", list(node.input[:3]), [main], name=node.name, domain=node.domain,
                                **attrs)
        nodes = [fast]
        block_sums = shared_sums.get((x, sums_name))
        if block_sums is None:  # MatMuls reading the same input (gate and up projections) share its block sums
            block_sums = shared_sums[(x, sums_name)] = f"{prefix}/block_sums"
            nodes.append(helper.make_node("MatMul", [x, sums_name], [block_sums], name=f"{prefix}/BlockSums"))
        nodes += [helper.make_node("MatMul", [block_sums, corr_name], [f"{prefix}/correction"],
                                   name=f"{prefix}/ZeroPointCorrection"),
                  helper.make_node("Add", [main, f"{prefix}/correction"], [y], name=f"{prefix}/Add")]
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
        index += len(nodes)
        if not any(zero_name in other.input for other in graph.node):
            graph.initializer.remove(zero)
            inits.pop(zero_name)
        rewritten += 1
    return rewritten


def integer_zero_points(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
                        iterations: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The closest form ``(q - z) s`` with an *integer* zero point ``z`` that the MatMulNBits kernel reads natively
    (packed uint4/uint8 zero points: the same speed as none), for blocks ``w`` ``[rows, block]`` starting from a
    float ``(scale, zero)`` per row (HQQ's). A float zero point cannot be folded exactly; per block this tries the
    zero points either side of the float one and refits the scale by least squares for each (a few alternations of
    rounding and refitting), keeping whichever leaves the smaller squared error. Returns ``q`` (uint8
    ``[rows, block]``), the scales and the integer zero points (float32 / uint8 ``[rows]``)."""
    top = 2.0 ** bits - 1
    w = w.astype(np.float64)
    best_q = best_s = best_z = best_err = None
    for candidate in (np.floor(zero), np.ceil(zero)):
        z = np.clip(candidate.astype(np.float64), 0, top)
        s = scale.astype(np.float64).copy()
        for _ in range(iterations):
            safe = np.where(s == 0, 1.0, s)
            q = np.clip(np.round(w / safe[:, None] + z[:, None]), 0, top)
            d = q - z[:, None]
            den = np.einsum("ij,ij->i", d, d)
            s = np.where(den > 0, np.einsum("ij,ij->i", d, w) / np.where(den > 0, den, 1.0), s)
        safe = np.where(s == 0, 1.0, s)
        q = np.clip(np.round(w / safe[:, None] + z[:, None]), 0, top)
        err = np.sum(((q - z[:, None]) * s[:, None] - w) ** 2, axis=1)
        if best_err is None:
            best_q, best_s, best_z, best_err = q, s, z, err
        else:
            better = err < best_err
            best_q[better], best_s[better], best_z[better], best_err[better] = q[better], s[better], z[better], \
                err[better]
    return best_q.astype(np.uint8), best_s.astype(np.float32), best_z.astype(np.uint8)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values ``[..., 2m]`` -> MatMulNBits' packing (4 bits: two per byte, the even index in the low nibble)."""
    if bits == 8:
        return values.astype(np.uint8)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def fold_float_zero_points(model, originals: dict[str, np.ndarray] | None = None) -> int:
    """Rewrites every MatMulNBits with float zero points (HQQ's) into one with packed integer zero points, the form
    the CPU kernel reads at full speed, with no extra node (:func:`integer_zero_points`; the fit targets the
    node's original float weight ``originals[name]`` ``[K, N]`` when given, else HQQ's own de-quantized weight).
    Returns the number of nodes rewritten. Not exact: measured in docs/performance.md against
    :func:`split_float_zero_points`, which is."""
    graph = model.graph
    inits = _initializers(graph)
    folded = 0
    for node in graph.node:
        zero_name = node.input[3] if node.op_type == "MatMulNBits" and len(node.input) > 3 else ""
        zero = inits.get(zero_name)
        if zero is None or zero.data_type == 2:  # absent, or already packed uint8
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
        blob = numpy_helper.to_array(inits[node.input[1]])
        blocks = blob.shape[1]
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n * blocks)
        zeros = numpy_helper.to_array(zero).astype(np.float32).reshape(n * blocks)
        original = (originals or {}).get(node.name.removesuffix(f"_Q{bits}"))
        if original is not None:
            target = np.zeros((n, blocks * block), np.float32)
            target[:, :k] = original.T
        else:
            target = dequantize_blocks(blob, scales, bits, blocks * block, zeros)
        q, s, z = integer_zero_points(target.reshape(n * blocks, block), scales, zeros, bits)
        new_blob = _pack(q.reshape(n, blocks, block), bits)
        z = z.reshape(n, blocks)
        if bits == 4 and blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        packed_zero = _pack(z, bits).reshape(-1)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_blob, node.input[1]))
        old_scales = numpy_helper.to_array(inits[node.input[2]])
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(s.astype(old_scales.dtype).reshape(old_scales.shape),
                                                              node.input[2]))
        zero.CopyFrom(numpy_helper.from_array(packed_zero, zero_name))
        folded += 1
    return folded


def _matmul_weights(model, excluded) -> dict[str, np.ndarray]:
    """``{MatMul node name: its constant weight [K, N]}`` of the MatMuls the quantizer may take."""
    inits = _initializers(model.graph)
    skip = set(excluded)
    return {n.name: numpy_helper.to_array(inits[n.input[1]]).copy() for n in model.graph.node
            if n.op_type == "MatMul" and n.name not in skip and len(n.input) > 1 and n.input[1] in inits}


def _initializers(graph) -> dict:
    return {i.name: i for i in graph.initializer}


def tie_embedding(model, fmt: WeightFormat) -> bool:
    """When the token-embedding Gather reads the LM head's matrix (tied weights), it reads the quantized LM head
    instead through ``GatherBlockQuantized``; the float matrix leaves the file. Returns whether it did."""
    graph = model.graph
    inits = _initializers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gather = next((n for n in graph.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[1] == INPUT_IDS), None)
    to_logits = _logits_producers(graph, producers)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] in to_logits), None)
    if gather is None or head is None:
        return False
    source = gather.input[0]
    transpose = producers.get(source)
    if transpose is not None and transpose.op_type == "Transpose":
        source = transpose.input[0]
    elif transpose is not None:
        return False
    if source not in inits:
        return False
    embed = numpy_helper.to_array(inits[source])
    if transpose is None:
        embed_rows = embed
    else:
        embed_rows = embed.T
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    n_out, k = int(attrs["N"]), int(attrs["K"])
    if embed_rows.shape != (n_out, k) or int(attrs["block_size"]) != fmt.block_size or len(head.input) > 3 \
            and head.input[3]:
        return False
    # The LM head's original float weight is gone; compare with its dequantized form to be sure the two are tied.
    blob, scales = numpy_helper.to_array(inits[head.input[1]]), numpy_helper.to_array(inits[head.input[2]])
    if not _is_tied(embed_rows, blob, scales, fmt, k):
        return False
    suffix = "/GatherBlockQuantized"
    data_name = head.input[1] + "/gather_view"
    shape_name = data_name + "/shape"
    per_row = blob.shape[1] * blob.shape[2]
    graph.initializer.append(numpy_helper.from_array(np.array([n_out, per_row], np.int64), shape_name))
    reshape = helper.make_node("Reshape", [head.input[1], shape_name], [data_name], name=gather.name + "/Reshape")
    scales_name = head.input[2]
    quantized = helper.make_node("GatherBlockQuantized", [data_name, gather.input[1], scales_name], list(gather.output),
                                 name=gather.name + suffix, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                 block_size=fmt.block_size, bits=fmt.bits)
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, quantized)
    graph.node.insert(index, reshape)
    if transpose is not None and len(consumers.get(transpose.output[0], [])) == 1:
        graph.node.remove(transpose)
    if not any(source in n.input for n in graph.node):
        graph.initializer.remove(inits[source])
    return True


def quantize_embedding(model, bits: int, block_size: int) -> bool:
    """The token embedding (the ``Gather`` of ``input_ids`` over a float matrix, directly or through a
    ``Transpose`` of the LM head's, as the builder ties them) as its own ``GatherBlockQuantized`` at ``bits`` (8:
    uint8 round to nearest, symmetric, blocks of ``block_size`` along the hidden axis, the kernel's default zero
    point 128). For a gate path kept at 8 bits: the embedding is the first thing the gate reads, and the int4 LM
    head it would otherwise share moves the gate (measured: docs/performance.md). Returns whether it did."""
    if bits != 8:
        raise AlignerError(f"the embedding is kept at 8 bits or shared with the LM head, not {bits}")
    graph = model.graph
    inits = _initializers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    gather = next((n for n in graph.node if n.op_type == "Gather" and len(n.input) == 2
                   and n.input[1] == INPUT_IDS), None)
    if gather is None:
        return False
    source, transpose = gather.input[0], producers.get(gather.input[0])
    if transpose is not None:
        if transpose.op_type != "Transpose":
            return False
        source = transpose.input[0]
    if source not in inits:
        return False
    embed = numpy_helper.to_array(inits[source]).astype(np.float32)
    rows = embed if transpose is None else embed.T
    vocab, hidden = rows.shape
    if hidden % block_size:
        return False
    blocks = rows.reshape(vocab, hidden // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    safe = np.where(scales == 0, 1.0, scales)
    data = (np.clip(np.round(blocks / safe[..., None]), -127, 127) + 128).astype(np.uint8).reshape(vocab, hidden)
    name = gather.name + "/GatherBlockQuantized"
    data_name, scales_name = source + "/embedding_q8", source + "/embedding_q8_scales"
    graph.initializer.extend([numpy_helper.from_array(data, data_name),
                              numpy_helper.from_array(scales.astype(np.float32), scales_name)])
    quantized = helper.make_node("GatherBlockQuantized", [data_name, gather.input[1], scales_name],
                                 list(gather.output), name=name, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                 block_size=block_size, bits=bits)
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, quantized)
    if transpose is not None and not any(transpose.output[0] in n.input for n in graph.node):
        graph.node.remove(transpose)
    if not any(source in n.input for n in graph.node):
        graph.initializer.remove(inits[source])
    return True


def _logits_producers(graph, producers) -> set[str]:
    """Outputs feeding ``logits`` through shape-only ops (an optional Reshape/Cast after the head)."""
    found = set()
    frontier = [o.name for o in graph.output if o.name == LOGITS]
    while frontier:
        name = frontier.pop()
        found.add(name)
        node = producers.get(name)
        if node is not None and node.op_type in ("Reshape", "Cast", "Identity", "Add"):
            frontier.extend(node.input[:1])
    return found


def dequantize_blocks(blob: np.ndarray, scales: np.ndarray, bits: int, k: int,
                      zero_points: np.ndarray | None = None) -> np.ndarray:
    """MatMulNBits' ``B`` ``[N, k_blocks, blob]`` uint8, ``scales`` ``[N, k_blocks]`` (or flat) and optional
    ``zero_points`` (packed uint8 like ``B``, or float per block as HQQ writes them; default: the middle of the
    range) -> the float ``[N, K]`` matrix it stands for: ``(q - zero_point) * scale``."""
    n, blocks, blob_size = blob.shape
    if bits == 4:
        low, high = blob & 0x0F, blob >> 4
        values = np.stack([low, high], axis=-1).reshape(n, blocks, blob_size * 2).astype(np.float32)
    else:
        values = blob.astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        per_row = zero_points.reshape(n, -1)
        if bits == 4:
            zero = np.stack([per_row & 0x0F, per_row >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        else:
            zero = per_row[:, :blocks]
        zero = zero.astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    out = (values - zero[:, :, None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return out.reshape(n, -1)[:, :k]


def _is_tied(embed_rows: np.ndarray, blob, scales, fmt: WeightFormat, k: int) -> bool:
    """The embedding equals the LM head's matrix up to one quantization step of each block (half a step of
    rounding; a whole one where symmetric quantization clips the block's largest positive value)."""
    dequant = dequantize_blocks(blob, scales, fmt.bits, k)
    step = np.repeat(scales.astype(np.float32).reshape(embed_rows.shape[0], -1), fmt.block_size, axis=1)[:, :k]
    return bool(np.all(np.abs(dequant - embed_rows.astype(np.float32)) <= np.abs(step) * (1 + 1e-5) + 1e-6))


def relative_weight_error(reference, quantized) -> float:
    """``||W_q - W|| / ||W||`` over every quantized MatMul weight (Frobenius, all matrices together): the error the
    quantizer injects, from which the logit tolerance is derived (docs/performance.md)."""
    ref = _initializers(reference.graph)
    q = _initializers(quantized.graph)
    ref_weights = {n.name: n.input[1] for n in reference.graph.node if n.op_type == "MatMul" and n.input[1] in ref}
    num = den = 0.0
    for node in quantized.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = node.name.removesuffix(f"_Q{int(attrs['bits'])}")  # the quantizer renames MatMul X to X_Q4 / X_Q8
        if name not in ref_weights:
            continue
        w = numpy_helper.to_array(ref[ref_weights[name]]).astype(np.float32)  # [K, N]
        zero = numpy_helper.to_array(q[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        dq = dequantize_blocks(numpy_helper.to_array(q[node.input[1]]), numpy_helper.to_array(q[node.input[2]]),
                               int(attrs["bits"]), int(attrs["K"]), zero)
        correction = q.get(f"{node.name}/zero_point_correction")  # a split float zero point: its exact remainder
        if correction is not None:
            block = int(attrs["block_size"])
            dq = dq + np.repeat(numpy_helper.to_array(correction).T, block, axis=1)[:, :dq.shape[1]]
        num += float(np.sum((dq - w.T) ** 2))
        den += float(np.sum(w.astype(np.float64) ** 2))
    return float(np.sqrt(num / den)) if den else 0.0


def steering_constants_unchanged(reference, quantized) -> bool:
    """The steering nodes and functions are identical in both graphs (the quantizer did not touch them)."""
    def steering(model):
        nodes = sorted((n.SerializeToString() for n in model.graph.node if is_steering_node(n.name)))
        functions = sorted(f.SerializeToString() for f in model.functions)
        return nodes, functions

    return steering(reference) == steering(quantized)
