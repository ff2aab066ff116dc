"""The graph rewrite: SteerGate and SteerShift placed into a base ONNX LLM with onnx-ir (docs/architecture.md §5,
§5.1, docs/contract.md).

- ``SteerGate`` reads each gate layer's output before any shift there, one node per gate layer written by the ONNX
  form of the gate's kind (``onnx_ops.GATE_OPS``, keyed by ``contract.GATE_KINDS``): the paper's gate is one node at
  ``g``; a chained kind (the linear gate) is a chain over the gate layers ``G``, each node adding its layer's term to
  the previous node's score (the first starts from zeros), the last one (at ``g* = max G``) adding the bias and
  deciding. The node at ``g*`` produces the graph outputs ``steer_gate`` and ``steer_score``.
- ``SteerShift`` (of the configuration's shift mode: version 1 "add" or version 2 "norm") follows each steered layer
  ``l`` and every consumer of that residual tensor reads its output
  instead. Its gate is ``steer_gate`` for ``l >= g*`` and ``max(steer_gate_in, 0)`` for ``l < g*`` (the runtime's
  two-pass rule).
- The graph gains the input ``steer_gate_in`` float32 ``[batch]``; nothing else changes.

``--steer-impl function`` keeps the ops as model-local functions; ``inline`` expands each node into the same body
(``onnx_ops.inline_nodes``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from aligner_runtime.contract import (GATE_IN, GATE_OUT, SCORE_OUT, STEER_GATE, STEER_PREFIX, STEER_SHIFT,
                                      SteerConfig, layer_prefix, node_name, shift_takes_decision)
from aligner_runtime.errors import AlignerError

from aligner_export.graph import onnx_ops
from aligner_export.graph.locate import ResidualSite, materialize, split_fused
from aligner_runtime.contract import ATTENTION_MASK, INPUTS_EMBEDS, INPUT_IDS
from aligner_runtime.contract.choices import STEER_IMPLS

CLAMPED_GATE_IN = STEER_PREFIX + "gate_in_clamped"
SCORE_ZERO = STEER_PREFIX + "score_zero"  # the first node's score_in in a chained gate


def _graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for v in graph.initializers.values()})
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _batch_dim(graph: ir.Graph):
    for value in graph.inputs:
        if value.name in (INPUT_IDS, INPUTS_EMBEDS) and value.shape is not None:
            return value.shape[0]
    return "batch_size"


def _attribute(proto: onnx.AttributeProto, values: dict[str, ir.Value]) -> ir.Attr:
    """A node attribute in onnx-ir. A subgraph (the If of an inlined SteerGate, issue 20) is read in the scope of the
    graph's ``values``, so that what it reads from the outer graph is those values and ``graph.sort()`` keeps the If
    after their producers (read alone, each outer name would become a dangling value of its own). onnx-ir has no
    public form of the scoped reader."""
    if proto.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return ir.serde._deserialize_attribute(proto, [dict(values)])
    return ir.serde.deserialize_attribute(proto)


def _emit(graph: ir.Graph, proto: onnx.NodeProto, impl: str, opset: int, values: dict[str, ir.Value],
          after: ir.Node | None) -> ir.Node:
    """Adds ``proto`` (or its inline body) to ``graph`` after ``after`` (at the front if None); returns the last."""
    protos = [proto] if impl == "function" else onnx_ops.inline_nodes(proto, opset)
    last = after
    for p in protos:
        inputs = [values[name] if name else None for name in p.input]
        attrs = [_attribute(a, values) for a in p.attribute]
        node = ir.Node(p.domain, p.op_type, inputs, attrs, num_outputs=len(p.output), name=p.name)
        for out, name in zip(node.outputs, p.output):
            out.name = name
            values[name] = out
        if last is None:
            graph.insert_before(next(iter(graph)), node)
        else:
            graph.insert_after(last, node)
        last = node
    return last


def _rewire(graph: ir.Graph, old: ir.Value, new: ir.Value, steer_prefix: str) -> None:
    """Every consumer of ``old`` reads ``new``, except the steering nodes of that layer (their names start with
    ``steer_prefix``): SteerShift itself and a SteerGate at the same layer read the unshifted output."""
    for use in list(old.uses()):
        if not (use.node.name or "").startswith(steer_prefix):
            use.node.replace_input_with(use.idx, new)
    for i, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[i] = new


def check_unsteered(graph: ir.Graph) -> None:
    existing = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    if GATE_IN in existing or any(n.domain == onnx_ops.DOMAIN for n in graph):
        raise AlignerError("the ONNX graph is already steered (it has steer_gate_in or inferaligner nodes)")


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def apply(model: ir.Model, sites: list[ResidualSite], config: SteerConfig) -> None:
    """Rewrites ``model`` in place (``sites`` from :func:`locate.locate_residuals`)."""
    graph = model.graph
    if config.steer_impl not in STEER_IMPLS:
        raise AlignerError(f"unknown --steer-impl '{config.steer_impl}': use one of {', '.join(STEER_IMPLS)}")
    check_unsteered(graph)
    if ATTENTION_MASK not in {v.name for v in graph.inputs}:
        raise AlignerError("the ONNX graph has no attention_mask input, which SteerGate needs")
    opset = default_opset(model)
    if opset < onnx_ops.MIN_OPSET:
        raise AlignerError(f"the ONNX graph uses opset {opset}; steering needs opset >= {onnx_ops.MIN_OPSET}")

    for site in sites:
        if site.layer in config.vectors:
            split_fused(graph, site)
    residual = {site.layer: materialize(graph, site) for site in sites
                if site.layer in config.gate.layers or site.layer in config.vectors}
    missing = sorted((set(config.gate.layers) | set(config.vectors)) - set(residual))
    if missing:
        raise AlignerError(f"no residual site located for layer {missing[0]}")
    batch = _batch_dim(graph)
    gate_in = ir.Value(name=GATE_IN, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch]))
    graph.inputs.append(gate_in)
    values = _graph_values(graph)
    mask = values[ATTENTION_MASK]

    # Layers below g shift with max(steer_gate_in, 0): the runtime's steered second pass (§5 placement).
    if config.two_pass:
        zero = onnx.helper.make_node("Constant", [], [STEER_PREFIX + "zero"],
                                     value=onnx.numpy_helper.from_array(np.array(0.0, np.float32)),
                                     name=STEER_PREFIX + "Constant")
        clamp = onnx.helper.make_node("Max", [GATE_IN, STEER_PREFIX + "zero"], [CLAMPED_GATE_IN],
                                      name=STEER_PREFIX + "Max")
        first = _emit(graph, zero, "function", opset, values, None)
        _emit(graph, clamp, "function", opset, values, first)

    gate = config.gate
    gate_nodes = _emit_gate(graph, config, residual, mask.name, opset, values)

    for layer in config.steer_layers:
        hidden = residual[layer]
        row_gate = GATE_OUT if shift_takes_decision(layer, gate.layers) else CLAMPED_GATE_IN
        out_name = f"{node_name(layer, STEER_SHIFT)}_output_0"
        shift_proto = onnx_ops.make_steer_shift_node(hidden.name, row_gate, out_name, config.vectors[layer],
                                                     node_name(layer, STEER_SHIFT), config.shift_version)
        # After SteerGate when both sit at the same layer, so SteerGate reads the unshifted output.
        anchor = gate_nodes.get(layer) or hidden.producer()
        _emit(graph, shift_proto, config.steer_impl, opset, values, anchor)
        shifted = values[out_name]
        shifted.type, shifted.shape = hidden.type, hidden.shape
        _rewire(graph, hidden, shifted, steer_prefix=layer_prefix(layer))

    for name in (GATE_OUT, SCORE_OUT):
        out = values[name]
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch])
        graph.outputs.append(out)

    if config.steer_impl == "function":
        # The domain's version covers the highest operator version the graph uses.
        model.opset_imports[onnx_ops.DOMAIN] = max(config.gate.version, config.shift_version)
        for proto in onnx_ops.function_protos(opset, config.gate.version, config.shift_version):
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function
    graph.sort()


def _emit_gate(graph: ir.Graph, config: SteerConfig, residual: dict, mask: str, opset: int,
               values: dict[str, ir.Value]) -> dict[int, ir.Node]:
    """Places the gate (docs/contract.md): one SteerGate node per gate layer, built by the ONNX form of the gate's
    kind (``onnx_ops.GATE_OPS``). A chained kind's scores accumulate from zeros along the gate layers; the node at
    g* decides and produces the graph's gate and score. Returns the last node emitted per layer."""
    gate = config.gate
    kind, op = gate.kind, onnx_ops.gate_op(gate.version)
    if not kind.chained and len(gate.layers) != 1:
        raise AlignerError(f"a {kind.name} gate reads one layer, got {list(gate.layers)}")
    score_in = None
    if kind.chained:
        shape = onnx.helper.make_node("Shape", [GATE_IN], [STEER_PREFIX + "batch_shape"], name=STEER_PREFIX + "Shape")
        zeros = onnx.helper.make_node("ConstantOfShape", [STEER_PREFIX + "batch_shape"], [SCORE_ZERO],
                                      value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)),
                                      name=STEER_PREFIX + "ConstantOfShape")
        _emit(graph, zeros, "function", opset, values, _emit(graph, shape, "function", opset, values, None))
        score_in = SCORE_ZERO
    emitted = {}
    for layer in gate.layers:
        name = node_name(layer, STEER_GATE)
        last = layer == gate.last_layer
        gate_out, score_out = (GATE_OUT, SCORE_OUT) if last else (f"{name}_gate", f"{name}_score")
        proto = op.node(gate, layer, residual[layer].name, mask, GATE_IN, score_in, gate_out, score_out, name)
        emitted[layer] = _emit(graph, proto, config.steer_impl, opset, values, residual[layer].producer())
        score_in = score_out
    return emitted


def is_steered(model_proto: onnx.ModelProto) -> bool:
    return any(i.name == GATE_IN for i in model_proto.graph.input)
