"""The residual locator: which tensor of an ONNX LLM holds each decoder layer's output (docs/architecture.md §3).

The rule is structural and exporter-independent: start at the token embedding (the ``Gather`` fed by ``input_ids``,
or the ``inputs_embeds`` input) and follow the chain of residual adds. Every decoder layer adds twice to the residual
stream (after attention, after the MLP), so layer ``l``'s output is the ``2l + 2``-th value of the chain. A residual
add is one of the steps in ``RESIDUAL_STEPS``: a plain ``Add`` (optimum, ``torch.onnx``) or ORT's fused
``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization`` (the onnxruntime-genai model builder), whose
output 3 is ``input + skip``.

The structural answer is then checked numerically against PyTorch forward hooks on a probe prompt
(:func:`verify_residuals`): a mismatch is a clear error, never a silently misplaced steering vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from aligner_runtime.errors import AlignerError
from aligner_runtime.contract import INPUTS_EMBEDS, INPUT_IDS

# Ops that only move or retype the token ids between ``input_ids`` and the embedding Gather.
_ID_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


@dataclass(frozen=True)
class ResidualStep:
    """One way an exporter writes a residual add: the op, and which output carries ``residual + branch``."""

    domain: str
    op_type: str
    sum_output: int


RESIDUAL_STEPS = (
    ResidualStep("", "Add", 0),
    ResidualStep("com.microsoft", "SkipSimplifiedLayerNormalization", 3),
    ResidualStep("com.microsoft", "SkipLayerNormalization", 3),
    ResidualStep("", "SkipSimplifiedLayerNormalization", 3),
)


def _step_for(node: ir.Node) -> ResidualStep | None:
    for step in RESIDUAL_STEPS:
        if node.op_type == step.op_type and node.domain in (step.domain, "ai.onnx" if not step.domain else step.domain):
            return step
    return None


def embedding_value(graph: ir.Graph) -> ir.Value:
    """The value the residual stream starts from."""
    inputs = {v.name: v for v in graph.inputs}
    if INPUTS_EMBEDS in inputs:
        return inputs[INPUTS_EMBEDS]
    if INPUT_IDS not in inputs:
        raise AlignerError("the ONNX graph has neither an input_ids nor an inputs_embeds input")
    frontier = [inputs[INPUT_IDS]]
    seen: set[int] = set()
    while frontier:
        value = frontier.pop()
        for user in value.consumers():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type == "Gather" and user.inputs[1] is value and _is_matrix_constant(user.inputs[0]):
                return user.outputs[0]
            if user.op_type in _ID_PASSTHROUGH:
                frontier.extend(user.outputs)
    raise AlignerError("cannot find the token embedding (a Gather of a 2-D weight fed by input_ids) in the graph")


def _is_matrix_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return len(value.const_value.shape) == 2
    producer = value.producer()
    # Weights may reach the Gather through a dequantize or cast node.
    return producer is not None and producer.op_type in ("Cast", "DequantizeLinear", "Identity") and \
        _is_matrix_constant(producer.inputs[0])


@dataclass
class ResidualSite:
    """Layer ``layer``'s output: produced as output ``output_index`` of ``node``."""

    layer: int
    node: ir.Node
    output_index: int
    step: ResidualStep

    @property
    def value(self) -> ir.Value | None:
        outputs = self.node.outputs
        return outputs[self.output_index] if self.output_index < len(outputs) else None


def _dtype(value: ir.Value, depth: int = 64) -> ir.DataType | None:
    """The element type of ``value``, from its type info or, when the exporter left none, from its producer."""
    if value.dtype is not None or depth == 0:
        return value.dtype
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Cast":
        return ir.DataType(node.attributes["to"].as_int())
    if node.op_type == "Gather":
        return _dtype(node.inputs[0], depth - 1)
    if node.op_type in ("Add", "Sub", "Mul", "Identity"):
        for operand in node.inputs:
            if operand is not None and (found := _dtype(operand, depth - 1)) is not None:
                return found
    return None


_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _aliases(value: ir.Value) -> list[ir.Value]:
    """``value`` and the values that carry the same residual: outputs of Identity and of float-to-float Casts.

    The exporters keep HF's ``hidden_states.to(float32)`` in RMSNorm as a Cast; in a float32 graph that Cast is a
    no-op which constant folding merges with the residual, so the next residual add reads the Cast's output. A
    float16 export upcasts the residual before the add in the same way.
    """
    found = [value]
    for user in value.consumers():
        if user.op_type == "Identity" or (user.op_type == "Cast" and _dtype(value) in _FLOAT_TYPES | {None}
                                         and ir.DataType(user.attributes["to"].as_int()) in _FLOAT_TYPES):
            found.extend(_aliases(user.outputs[0]))
    return found


def residual_chain(graph: ir.Graph, limit: int | None = None) -> list[tuple[ir.Node, ResidualStep]]:
    """The residual adds from the embedding on, in order (at most ``limit``)."""
    current = embedding_value(graph)
    chain: list[tuple[ir.Node, ResidualStep]] = []
    while limit is None or len(chain) < limit:
        candidates = []
        for alias in _aliases(current):
            for user in alias.consumers():
                step = _step_for(user)
                # The residual enters an Add directly, or a fused skip-norm as its input or skip (inputs 0 and 1).
                if step is not None and any(user.inputs[i] is alias for i in range(min(2, len(user.inputs)))) \
                        and all(user is not c for c, _ in candidates):
                    candidates.append((user, step))
        if not candidates:
            break
        if len(candidates) > 1:
            names = ", ".join(n.name or n.op_type for n, _ in candidates)
            raise AlignerError(f"ambiguous residual stream after {current.name}: several adds consume it ({names})")
        node, step = candidates[0]
        chain.append((node, step))
        if step.sum_output >= len(node.outputs) or not node.outputs[step.sum_output].consumers() \
                and not node.outputs[step.sum_output].is_graph_output():
            # A fused final norm may leave output 3 unused: the chain ends here.
            break
        current = node.outputs[step.sum_output]
    return chain


def locate_residuals(graph: ir.Graph, num_layers: int) -> list[ResidualSite]:
    """One :class:`ResidualSite` per decoder layer, ``0 .. num_layers - 1``."""
    chain = residual_chain(graph, limit=2 * num_layers)
    if len(chain) != 2 * num_layers:
        raise AlignerError(f"found {len(chain)} residual adds from the embedding, expected {2 * num_layers} "
                           f"(2 per decoder layer, {num_layers} layers): the graph's structure is not supported")
    return [ResidualSite(layer=l, node=chain[2 * l + 1][0], output_index=chain[2 * l + 1][1].sum_output,
                         step=chain[2 * l + 1][1]) for l in range(num_layers)]


def materialize(graph: ir.Graph, site: ResidualSite) -> ir.Value:
    """The value of ``site``, creating the fused node's sum output if the exporter left it out."""
    value = site.value
    if value is not None:
        if not value.name:
            value.name = f"/model/layers.{site.layer}/residual_output"
        return value
    old = site.node
    new = ir.Node(old.domain, old.op_type, list(old.inputs), list(old.attributes.values()),
                  num_outputs=site.output_index + 1, name=old.name, version=old.version)
    for i, out in enumerate(old.outputs):
        out.replace_all_uses_with(new.outputs[i], replace_graph_outputs=True)
        new.outputs[i].name, out.name = out.name, None
        new.outputs[i].type, new.outputs[i].shape = out.type, out.shape
    graph.insert_after(old, new)
    graph.remove(old, safe=True)
    site.node = new
    value = new.outputs[site.output_index]
    value.name = f"/model/layers.{site.layer}/residual_output"
    return value


def probe_outputs(model: ir.Model, names: list[str]) -> None:
    """Adds the named values as graph outputs (on a temporary copy used for verification)."""
    values = {v.name: v for v in _all_values(model.graph)}
    for name in names:
        model.graph.outputs.append(values[name])


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.inputs)
    for node in graph:
        values.extend(node.outputs)
    return values


def compare_residuals(onnx_values: dict[int, np.ndarray], torch_values: dict[int, np.ndarray],
                      rel_tolerance: float) -> None:
    """Raises a clear :class:`AlignerError` unless every located tensor equals the hooked layer output."""
    for layer, expected in torch_values.items():
        actual = onnx_values[layer]
        if actual.shape != expected.shape:
            raise AlignerError(f"residual locator: layer {layer} tensor has shape {actual.shape}, the PyTorch layer "
                               f"output has {expected.shape}")
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(actual.astype(np.float64) - expected).max())
        if not diff <= rel_tolerance * scale:
            raise AlignerError(f"residual locator: the tensor found for layer {layer} differs from the PyTorch layer "
                               f"output by {diff:.3g} (scale {scale:.3g}); the graph's residual stream is not where "
                               "the locator expects it")


def split_fused(graph: ir.Graph, site: ResidualSite) -> None:
    """Splits a fused skip-norm at a steered site into ``Add`` + the plain norm.

    The fused node computes ``sum = input + skip`` and ``norm(sum)`` in one op, so a shift of ``sum`` (output 3)
    would not reach its own output 0, the next layer's normalised input. After the split, SteerShift sits between
    the two and every reader of the residual, the norm included, sees the shifted value (§5 placement).
    """
    node = site.node
    if site.step.op_type == "Add":
        return
    for i in (1, 2):
        if i < len(node.outputs) and node.outputs[i].consumers():
            raise AlignerError(f"{node.name}: the fused norm's statistics output {i} is used; cannot steer there")
    epsilon = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
    data, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    prefix = node.name or f"/model/layers.{site.layer}/residual"
    add = ir.Node("", "Add", [data, skip], name=f"{prefix}/Add")
    nodes = [add]
    total = add.outputs[0]
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    bias = node.inputs[4] if len(node.inputs) > 4 else (node.inputs[3] if simplified and len(node.inputs) > 3 else None)
    if bias is not None:
        add_bias = ir.Node("", "Add", [total, bias], name=f"{prefix}/AddBias")
        nodes.append(add_bias)
        total = add_bias.outputs[0]
    if simplified:
        norm = ir.Node("", "SimplifiedLayerNormalization", [total, gamma],
                       [ir.AttrFloat32("epsilon", epsilon), ir.AttrInt64("axis", -1), ir.AttrInt64("stash_type", 1)],
                       name=f"{prefix}/SimplifiedLayerNormalization")
    else:
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        norm = ir.Node("", "LayerNormalization", [total, gamma] + ([beta] if beta is not None else []),
                       [ir.AttrFloat32("epsilon", epsilon), ir.AttrInt64("axis", -1)],
                       name=f"{prefix}/LayerNormalization")
    nodes.append(norm)
    old_out, old_sum = node.outputs[0], (node.outputs[3] if len(node.outputs) > 3 else None)
    norm.outputs[0].name, old_out.name = old_out.name, None
    norm.outputs[0].type, norm.outputs[0].shape = old_out.type, old_out.shape
    old_out.replace_all_uses_with(norm.outputs[0], replace_graph_outputs=True)
    sum_name = f"/model/layers.{site.layer}/residual_output"
    if old_sum is not None:
        sum_name, old_sum.name = old_sum.name or sum_name, None
        old_sum.replace_all_uses_with(total, replace_graph_outputs=True)
    total.name = sum_name
    for new in nodes:
        graph.insert_before(node, new)
    graph.remove(node, safe=True)
    site.node, site.output_index, site.step = nodes[-2], 0, RESIDUAL_STEPS[0]
