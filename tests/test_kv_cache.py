"""The ONNX Runtime backend's KV cache (issue 11): I/O binding with the cache kept in bound buffers gives the same
greedy tokens, gates and scores as the plain path (presents through numpy), for optimum graphs (growing cache) and for
GroupQueryAttention graphs (one buffer shared by past and present), with mixed gates in a batch and both paddings.

The plain path is the loop's :class:`~aligner_runtime.generate.NumpyKV`, run through a backend view without
``kv_cache``; the session and graph are the same, so the figures must agree to the last bit of the argmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aligner_runtime.api import Aligner
from aligner_runtime.backends.onnxruntime import OnnxRuntimeBackend
from aligner_runtime.generate import GenerationRun, SamplingConfig
from runtime_exports import DEFAULT_OPTIONS, LINEAR_OPTIONS, tiny_export
from test_runtime_export import mixed_prompts


class PlainView:
    """The same backend without its own KV cache: the loop falls back to numpy presents."""

    def __init__(self, backend: OnnxRuntimeBackend, padding_side: str):
        self._backend = backend
        self.input_names, self.output_names = backend.input_names, backend.output_names
        self.vocab_size, self.past_spec = backend.vocab_size, backend.past_spec
        self.padding_side = padding_side

    def _run(self, feeds):
        return self._backend._run(feeds)


def _runs(backend, prompts, padding_side, two_pass, max_new_tokens=8, compact=True):
    """Results of the bound path and the plain path over the same prompts."""
    out = []
    for view in (backend, PlainView(backend, padding_side)):
        if view is backend:
            backend.padding_side = padding_side
        run = GenerationRun(view, prompts, SamplingConfig(max_new_tokens=max_new_tokens), pad_token_id=0,
                            two_pass=two_pass, compact=compact)
        out.append(run.run())
    return out


@pytest.fixture(scope="module", params=["paper", "linear"])
def export(request, tmp_path_factory, tiny_model_dir):
    return tiny_export(tmp_path_factory, tiny_model_dir, "llama",
                       DEFAULT_OPTIONS if request.param == "paper" else LINEAR_OPTIONS)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("compact", [True, False])
def test_bound_cache_equals_numpy_path(export, padding_side, compact):
    export_dir, _, _ = export
    aligner = Aligner.load(export_dir)
    aligner.stop_token_ids = ()
    prompts = [aligner.encode(p) for p in mixed_prompts(aligner, 2)]
    backend = aligner._backend
    assert not backend.shares_kv_buffer and backend.padding_side == "left"  # an optimum graph: growing cache
    bound, plain = _runs(backend, prompts, padding_side, aligner.export.two_pass, compact=compact)
    assert sorted({r.gate for r in bound}) == [0.0, 1.0]  # mixed gates in the batch
    for a, b in zip(bound, plain):
        assert (a.token_ids, a.gate) == (b.token_ids, b.gate)
        assert a.score == pytest.approx(b.score, abs=1e-6)


def test_right_padding_matches_left_padding(export):
    """The optimum graph takes either padding; greedy tokens and gates agree between the two."""
    export_dir, _, _ = export
    aligner = Aligner.load(export_dir)
    aligner.stop_token_ids = ()
    prompts = [aligner.encode(p) for p in mixed_prompts(aligner, 2)]
    backend = aligner._backend
    (left, _), (right, _) = (_runs(backend, prompts, side, aligner.export.two_pass) for side in ("left", "right"))
    for a, b in zip(left, right):
        assert a.gate == b.gate and a.score == pytest.approx(b.score, abs=1e-4)
        assert a.token_ids[:4] == b.token_ids[:4]


# --- a GroupQueryAttention graph, as the onnxruntime-genai builder writes the attention --------------------------------
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MAX_POS = 50, 32, 4, 2, 16, 128


def gqa_graph(path: Path, seed: int = 0) -> Path:
    """A one-layer decoder: embedding, GroupQueryAttention (rotary inside, seqlens_k from the mask, as the builder
    does), output projection with a residual add, LM head. Random weights; unsteered."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inv = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.outer(np.arange(MAX_POS), inv)
    weights = {
        "embed": rng.normal(size=(VOCAB, HIDDEN)), "w_qkv": rng.normal(scale=0.3, size=(HIDDEN, qkv)),
        "w_o": rng.normal(scale=0.3, size=(HEADS * HEAD_DIM, HIDDEN)), "w_out": rng.normal(size=(HIDDEN, VOCAB)),
        "cos_cache": np.cos(angles), "sin_cache": np.sin(angles),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "one_axes"),
              numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(1, np.int64),
                                                                                             "axis_one")]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="/model/embed_tokens/Gather"),
        helper.make_node("ReduceSum", ["attention_mask", "one_axes"], ["lengths"], keepdims=0),
        helper.make_node("Sub", ["lengths", "one"], ["seqlens"]),
        helper.make_node("Cast", ["seqlens"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "axis_one"], ["total"]),
        helper.make_node("Cast", ["total"], ["total_len"], to=TensorProto.INT32),
        helper.make_node("MatMul", ["h0", "w_qkv"], ["qkv"]),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                 "seqlens_k", "total_len", "cos_cache", "sin_cache"],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=HEADS,
                         kv_num_heads=KV_HEADS, do_rotary=1, name="/model/layers.0/attn/GroupQueryAttention"),
        helper.make_node("MatMul", ["attn", "w_o"], ["o"]),
        helper.make_node("Add", ["h0", "o"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w_out"], ["logits"]),
        helper.make_node("ReduceMean", ["h1", "one_axes"], ["h_mean"], keepdims=0),
    ]
    past = ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    present = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    graph = helper.make_graph(
        nodes, "tiny_gqa",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, past)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, present),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, present),
         # an output after the presents, as steer_gate/steer_score follow them in a steered graph
         helper.make_tensor_value_info("h_mean", TensorProto.FLOAT, ["batch_size", HIDDEN])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def gqa_backend(tmp_path_factory):
    return OnnxRuntimeBackend(gqa_graph(tmp_path_factory.mktemp("gqa") / "model.onnx"))


PROMPTS = [[3, 7, 11, 5, 9, 2, 14], [4, 8], [21, 22, 23, 24, 25]]


def test_gqa_graph_shares_the_buffer_and_pads_right(gqa_backend):
    from aligner_runtime.generate import KV_FEED

    assert gqa_backend.shares_kv_buffer and gqa_backend.padding_side == "right"
    cache = gqa_backend.kv_cache(2, 16)
    assert all(a.shape == (2, KV_HEADS, 16, HEAD_DIM) for a in cache.arrays.values())
    ids = np.array([[3, 4, 5], [6, 7, 0]], np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.int64)
    bound = gqa_backend._run({"input_ids": ids, "attention_mask": mask, KV_FEED: cache})
    plain = gqa_backend._run({"input_ids": ids, "attention_mask": mask,
                              **{n: np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32) for n in gqa_backend.past_names}})
    assert set(bound) == {"logits", "h_mean"}  # the presents stay in the cache
    np.testing.assert_array_equal(bound["h_mean"], plain["h_mean"])
    np.testing.assert_array_equal(bound["logits"], plain["logits"])
    # the keys were written in place, at positions 0..2 of row 0 and 0..1 of row 1
    np.testing.assert_array_equal(cache.arrays["past_key_values.0.key"][0, :, :3], plain["present.0.key"][0])
    np.testing.assert_array_equal(cache.arrays["past_key_values.0.key"][1, :, :2], plain["present.0.key"][1, :, :2])


@pytest.mark.parametrize("compact", [True, False])
def test_gqa_shared_buffer_equals_numpy_path(gqa_backend, compact):
    """Shared past/present buffer (written in place, preallocated) against the same graph fed and returning
    numpy arrays (GroupQueryAttention then concatenates itself), right padding, rows of different lengths."""
    bound, plain = _runs(gqa_backend, PROMPTS, "right", two_pass=False, max_new_tokens=12, compact=compact)
    for a, b in zip(bound, plain):
        assert a.token_ids == b.token_ids


def test_gqa_rows_are_independent_of_their_batch(gqa_backend):
    """Each row of a right-padded batch generates what it generates alone: padding and the shared buffer leak
    nothing between rows."""
    batch, _ = _runs(gqa_backend, PROMPTS, "right", two_pass=False, max_new_tokens=10)
    for prompt, together in zip(PROMPTS, batch):
        alone, _ = _runs(gqa_backend, [prompt], "right", two_pass=False, max_new_tokens=10)
        assert alone[0].token_ids == together.token_ids


def test_gqa_decode_logits_equal_a_full_recompute(gqa_backend):
    """Every decode step through the shared buffer equals a prefill of the whole sequence (no cache)."""
    import onnxruntime as ort

    run = GenerationRun(gqa_backend, [PROMPTS[0]], SamplingConfig(max_new_tokens=6), pad_token_id=0,
                        two_pass=False)
    result = run.run()[0]
    ids = PROMPTS[0] + result.token_ids
    session = gqa_backend.session
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    feeds.update({n: np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for n in gqa_backend.past_names})
    logits = session.run(["logits"], feeds)[0][0]
    expected = logits[len(PROMPTS[0]) - 1:-1].argmax(-1).tolist()
    assert expected == result.token_ids
    assert isinstance(session, ort.InferenceSession)


# --- the onnxruntime-genai builder's graph of a tiny llama, steered (needs the builder's venv) ------------------------
@pytest.fixture(scope="module")
def builder_export(tmp_path_factory, tiny_model_dir):
    from aligner_export.hf.base_export import genai_python

    if not genai_python().is_file():
        pytest.skip(f"the onnxruntime-genai builder's venv is absent ({genai_python()}; make genai-venv)")
    return tiny_export(tmp_path_factory, tiny_model_dir, "llama", DEFAULT_OPTIONS + (("--exporter", "genai"),))[0]


def test_builder_graph_is_steered_validated_and_shares_its_buffer(builder_export):
    """GroupQueryAttention, fused skip-norms and the builder's tied embedding, steered: validated against the
    PyTorch reference (right padding, mixed gates), then generated through the shared buffer, equal to the numpy
    path."""
    import json

    manifest = json.loads((builder_export / "inferaligner.json").read_text())
    assert manifest["exporter"] == "onnxruntime-genai" and manifest["validation"]["passed"]
    assert sorted(set(manifest["validation"]["gates"])) == [0.0, 1.0]
    aligner = Aligner.load(builder_export)
    backend = aligner._backend
    assert backend.shares_kv_buffer and backend.padding_side == "right"
    aligner.stop_token_ids = ()
    prompts = [aligner.encode(p) for p in mixed_prompts(aligner, 2)]
    bound, plain = _runs(backend, prompts, "right", aligner.export.two_pass)
    for a, b in zip(bound, plain):
        assert (a.token_ids, a.gate) == (b.token_ids, b.gate)
