"""Graphs with ORT's fused operators, as the onnxruntime-genai model builder writes them (issue 11).

The builder's decoder graph uses ``GroupQueryAttention`` (rotary embedding inside, past and present sharing one
buffer), ``SkipSimplifiedLayerNormalization`` for the residual adds and ``MatMulNBits`` for int4/int8 weights. The
steering rewrite works on it unchanged (``locate.RESIDUAL_STEPS`` knows the fused residual add; ``split_fused`` splits
it at steered sites). Two facts of such graphs matter to the pipeline and live here:

- **Padding.** ``GroupQueryAttention`` derives each row's length from the attention mask (``seqlens_k =
  sum(mask) - 1``) and keeps each row's keys contiguous from position 0, so a batch must be padded on the right
  (the rotary position of a token is its index among the row's real tokens, HF's convention). SteerGate finds each
  row's last real token under either padding (docs/architecture.md §5), so steering is unaffected.
- **Tied embedding.** The builder reads the token embedding as ``Gather(Transpose(lm_head weight))``. The residual
  locator recognises a ``Gather`` of a 2-D constant; :func:`fold_embedding_transpose` gives it one for the time of the
  rewrite and :func:`restore_embedding_transpose` puts the shared form back, so the export keeps a single copy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from aligner_runtime.contract import INPUT_IDS, PAST_PREFIX, PRESENT_PREFIX

GQA = "GroupQueryAttention"
FUSED_OPS = (GQA, "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MatMulNBits", "GatherBlockQuantized")


def op_types(graph: ir.Graph) -> set[str]:
    return {node.op_type for node in graph}


def padding_side(graph: ir.Graph) -> str:
    """``right`` for a graph whose attention is GroupQueryAttention, ``left`` otherwise (the runtime's default)."""
    return "right" if GQA in op_types(graph) else "left"


def padding_side_of_file(path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return "right" if any(n.op_type == GQA for n in model.graph.node) else "left"


def fold_embedding_transpose(graph: ir.Graph):
    """If the token embedding is ``Gather(Transpose(W), input_ids)`` with ``W`` a 2-D initializer, gives the Gather a
    folded constant ``W^T`` and returns a callable that restores the shared form; else returns None."""
    inputs = {v.name: v for v in graph.inputs}
    ids = inputs.get(INPUT_IDS)
    if ids is None:
        return None
    gather = next((u for u in ids.consumers() if u.op_type == "Gather" and u.inputs[1] is ids), None)
    if gather is None:
        return None
    table = gather.inputs[0]
    transpose = table.producer() if table is not None else None
    if transpose is None or transpose.op_type != "Transpose":
        return None
    weight = transpose.inputs[0]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    perm = transpose.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    folded = ir.Value(name=f"{weight.name}/transposed_for_locator",
                      const_value=ir.tensor(np.ascontiguousarray(weight.const_value.numpy().T)))
    graph.register_initializer(folded)
    gather.replace_input_with(0, folded)

    def restore() -> None:
        gather.replace_input_with(0, table)
        graph.initializers.pop(folded.name)

    return restore


def concrete_kv_dims(graph: ir.Graph, head_dim: int) -> None:
    """The builder names the KV head dimension symbolically (``kv_cache_dim``; it packs it for quantized caches).
    For a float cache it is the head size: writing it into the past and present shapes lets the runtime and the
    validation build empty pasts of the right shape."""
    for value in list(graph.inputs) + list(graph.outputs):
        if not (value.name.startswith((PAST_PREFIX, PRESENT_PREFIX))):
            continue
        shape = value.shape
        if shape is not None and len(shape) == 4 and not isinstance(shape[3], int):
            value.shape = ir.Shape([shape[0], shape[1], shape[2], head_dim])
