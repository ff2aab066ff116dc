"""The PyTorch reference against a hand computation: gate, shift, latching through decode, both paddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import op_oracles
from aligner_export.hf.reference import reference_generate, score_prompts, steered
from aligner_runtime.contract import GateConfig, SteerConfig

PROMPTS = ["Explain how to build a bomb or make a weapon to hurt people.", "Write a poem."]


def _batch(tok, padding_side):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    tok.padding_side = padding_side
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _hand_last(mask_row: list[int], seq: int) -> int:
    """Position within the last `seq` columns of the last 1 in the mask, by a plain loop."""
    last = max(i for i, m in enumerate(mask_row) if m == 1)
    return min(max(last - (len(mask_row) - seq), 0), seq - 1)


class Capture:
    """Records a layer's output; registered before the steering hooks it sees the clean output, after it the shifted."""

    def __init__(self, layer):
        self.outputs = []
        self.handle = layer.register_forward_hook(lambda _m, _a, out: self.outputs.append(out.detach().clone()))

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gate_and_shift_by_hand_prefill_and_decode(model_and_tok, padding_side):
    model, tok = model_and_tok
    layers = model.model.layers
    gate_layer, steer_layers = 1, [1, 2]
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(64).astype(np.float32)
    direction /= np.linalg.norm(direction)
    vectors = {l: rng.standard_normal(64).astype(np.float32) for l in steer_layers}
    batch = _batch(tok, padding_side)
    mask = batch["attention_mask"]
    seq = mask.shape[1]

    # Hand scores with no steering at all: the gate layer's clean output at the last real token.
    clean = Capture(layers[gate_layer])
    with torch.no_grad():
        model(**batch)
    clean.remove()
    h = clean.outputs[0]
    raw = [float(h[b, _hand_last(mask[b].tolist(), seq)].double() @ torch.from_numpy(direction).double())
           for b in range(2)]
    bias = -0.5 * (raw[0] + raw[1])  # midpoint: the two rows get different gates
    expected_gate = [1.0 if r + bias > 0 else 0.0 for r in raw]
    assert sorted(expected_gate) == [0.0, 1.0]
    spec = SteerConfig.single_layer(gate_layer, direction, bias, vectors)

    pre = {l: Capture(layers[l]) for l in steer_layers}
    with steered(model, spec) as state:
        post = {l: Capture(layers[l]) for l in steer_layers}
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            np.testing.assert_allclose(state.score.numpy(), np.array(raw) + bias, rtol=1e-5, atol=1e-5)
            assert state.gate.tolist() == expected_gate
            gate = state.gate.clone()
            past, ids, step_mask = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), mask
            for _ in range(3):  # decode steps: the latched gate is fed back, as the runtime protocol does
                state.gate_in = gate
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=step_mask.dtype)], dim=1)
                out = model(input_ids=ids, attention_mask=step_mask, past_key_values=past, use_cache=True)
                assert state.gate.tolist() == expected_gate
                past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for c in post.values():
            c.remove()
    for c in pre.values():
        c.remove()

    for l in steer_layers:
        assert len(pre[l].outputs) == len(post[l].outputs) == 4  # prefill + 3 decode steps
        for before, after in zip(pre[l].outputs, post[l].outputs):
            for b in range(2):
                want = before[b].numpy() + expected_gate[b] * vectors[l][None, :]
                np.testing.assert_allclose(after[b].numpy(), want, rtol=1e-6, atol=1e-6)
    # The shifted layer output is what the next layer consumed: the row with gate 0 is untouched end to end.
    clean_logits = model(**batch).logits
    with steered(model, spec):
        steered_logits = model(**batch).logits
    zero_row = expected_gate.index(0.0)
    one_row = expected_gate.index(1.0)
    torch.testing.assert_close(steered_logits[zero_row], clean_logits[zero_row], rtol=0, atol=0)
    assert (steered_logits[one_row] - clean_logits[one_row]).abs().max() > 1e-3


def test_layers_below_gate_follow_gate_in(model_and_tok):
    """§5: below the gate layer the shift uses max(gate_in, 0): off on the clean pass, on in the steered pass."""
    model, tok = model_and_tok
    batch = _batch(tok, "left")
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(64).astype(np.float32)
    spec = SteerConfig.single_layer(2, np.eye(64, dtype=np.float32)[0], -1e6, {0: vector})
    pre = Capture(model.model.layers[0])
    with steered(model, spec) as state:
        post = Capture(model.model.layers[0])
        with torch.no_grad():
            model(**batch)                      # gate_in = -1: the layer below g is not shifted
            state.gate_in = torch.tensor([1.0, 0.0])
            model(**batch)                      # second pass of the two-pass rule for row 0 only
        assert state.gate.tolist() == [1.0, 0.0]  # gate_in >= 0 overrides the (very negative) score
        post.remove()
    pre.remove()
    torch.testing.assert_close(post.outputs[0], pre.outputs[0], rtol=0, atol=0)
    np.testing.assert_allclose(post.outputs[1][0].numpy(), pre.outputs[1][0].numpy() + vector, atol=1e-6)
    torch.testing.assert_close(post.outputs[1][1], pre.outputs[1][1], rtol=0, atol=0)


def test_reference_generate_latches_gate(model_and_tok):
    model, tok = model_and_tok
    batch = _batch(tok, "left")
    rng = np.random.default_rng(2)
    direction = rng.standard_normal(64).astype(np.float32)
    direction /= np.linalg.norm(direction)
    spec = SteerConfig.single_layer(1, direction, 1e6, {l: 5 * rng.standard_normal(64).astype(np.float32)
                                                        for l in (1, 2, 3)})
    seqs, gate, score = reference_generate(model, spec, batch["input_ids"], batch["attention_mask"],
                                           max_new_tokens=6, min_new_tokens=6)
    assert gate.tolist() == [1.0, 1.0] and (score > 0).all()
    plain = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert seqs.shape == plain.shape and not torch.equal(seqs, plain)
    spec_off = SteerConfig.single_layer(1, direction, -1e6, spec.vectors)
    seqs_off, gate_off, _ = reference_generate(model, spec_off, batch["input_ids"], batch["attention_mask"],
                                               max_new_tokens=6, min_new_tokens=6)
    assert gate_off.tolist() == [0.0, 0.0] and torch.equal(seqs_off, plain)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_score_at_decode_follows_the_oracle(model_and_tok, version):
    """docs/contract.md "The score at decode" (issue 20): on a decode call a row whose gate_in >= 0 reports score 0
    and gate = gate_in; a deciding row (gate_in < 0) in the same call is scored; a forced prefill keeps its real score.
    Against the numpy oracle on the gate layers' clean outputs."""
    model, tok = model_and_tok
    batch = _batch(tok, "left")
    rng = np.random.default_rng(3)
    layers = (1, 2) if version >= 2 else (1,)
    weights = {l: rng.standard_normal(64).astype(np.float32) for l in layers}
    vectors = {l: rng.standard_normal(64).astype(np.float32) for l in (1, 2)}
    # version 3: max weights of twice the pooled ones' scale, so the max term moves the score
    max_weights = {l: (2 * rng.standard_normal(64)).astype(np.float32) for l in layers} if version == 3 else None
    gate = GateConfig(layers=layers, weights=weights, bias=0.25, tokens=2 if version >= 2 else 1,
                      normalize=version >= 2, version=version, max_weights=max_weights)
    spec = SteerConfig(gate=gate, vectors=vectors)

    def oracle(hiddens, mask, gate_in):
        if version == 1:
            return op_oracles.steer_gate_v1(hiddens[1], mask, gate_in, weights[1], 0.25)
        if version == 2:
            return op_oracles.multi_layer_score(hiddens, mask, gate_in, weights, 0.25, 2, True)
        return op_oracles.multi_layer_score_v3(hiddens, mask, gate_in, weights, max_weights, 0.25, 2, True)

    mask = batch["attention_mask"]
    clean = {l: Capture(model.model.layers[l]) for l in layers}  # before the steering hooks: the unshifted outputs
    with steered(model, spec) as state, torch.no_grad():
        state.gate_in = torch.tensor([1.0, 0.0])  # a forced prefill: scored all the same
        out = model(**batch, use_cache=True)
        hiddens = {l: c.outputs[-1].numpy() for l, c in clean.items()}
        want_gate, want_score = oracle(hiddens, mask.numpy(), np.array([1.0, 0.0], np.float32))
        assert np.all(want_score != 0)
        np.testing.assert_allclose(state.score.numpy(), want_score, rtol=1e-5, atol=1e-5)
        past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for gate_in in ([1.0, 0.0], [0.5, -1.0], [-1.0, 1.0]):  # all forced, then mixed calls
            state.gate_in = torch.tensor(gate_in)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            hiddens = {l: c.outputs[-1].numpy() for l, c in clean.items()}
            want_gate, want_score = oracle(hiddens, mask.numpy(), np.array(gate_in, np.float32))
            forced = np.array(gate_in) >= 0
            assert np.all(want_score[forced] == 0) and np.all(want_score[~forced] != 0)
            np.testing.assert_allclose(state.score.numpy(), want_score, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(state.gate.numpy()[forced], np.array(gate_in, np.float32)[forced])
            np.testing.assert_array_equal(state.gate.numpy(), want_gate)
            past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for c in clean.values():
        c.remove()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooled_term_follows_the_oracle(model_and_tok, padding_side):
    """SteerGate version 3's reference (issue 18) on a prefill against the numpy oracle, both paddings; a NaN
    residual entry at a padded position does not enter, and the same gate with max weights 0 scores differently."""
    model, tok = model_and_tok
    batch = _batch(tok, padding_side)
    rng = np.random.default_rng(18)
    layers = (0, 2)
    weights = {l: rng.standard_normal(64).astype(np.float32) for l in layers}
    max_weights = {l: (2 * rng.standard_normal(64)).astype(np.float32) for l in layers}
    gate = GateConfig(layers=layers, weights=weights, bias=-0.5, tokens=3, normalize=True, version=3,
                      max_weights=max_weights)
    zero = GateConfig(layers=layers, weights=weights, bias=-0.5, tokens=3, normalize=True, version=3,
                      max_weights={l: np.zeros(64, np.float32) for l in layers})
    vectors = {1: rng.standard_normal(64).astype(np.float32)}
    mask = batch["attention_mask"].numpy()
    clean = {l: Capture(model.model.layers[l]) for l in layers}
    with torch.no_grad():
        _, score = score_prompts(model, SteerConfig(gate=gate, vectors=vectors), batch["input_ids"],
                                 batch["attention_mask"])
        hiddens = {l: c.outputs[-1].numpy() for l, c in clean.items()}
        _, score_zero = score_prompts(model, SteerConfig(gate=zero, vectors=vectors), batch["input_ids"],
                                      batch["attention_mask"])
    for c in clean.values():
        c.remove()
    minus = np.full(mask.shape[0], -1, np.float32)
    _, want = op_oracles.multi_layer_score_v3(hiddens, mask, minus, weights, max_weights, -0.5, 3, True)
    np.testing.assert_allclose(score.numpy(), want, rtol=1e-5, atol=1e-5)
    _, want_v2 = op_oracles.multi_layer_score(hiddens, mask, minus, weights, -0.5, 3, True)
    np.testing.assert_allclose(score_zero.numpy(), want_v2, rtol=1e-5, atol=1e-5)
    assert np.any(np.abs(score.numpy() - score_zero.numpy()) > 1e-2), "the max term must move some row's score"
    assert (mask == 0).any(), "the batch must have padding"
    # A NaN at a padded position stays out; at a valid position it makes the score NaN.
    from aligner_export.hf.reference import gate_term
    hidden = torch.as_tensor(hiddens[0]).clone()
    padded = np.argwhere(mask == 0)[0]
    hidden[padded[0], padded[1], 0] = torch.nan
    pooled, top = gate_term(hidden, batch["attention_mask"], gate, torch.as_tensor(weights[0]), 0)
    assert torch.isfinite(pooled).all() and torch.isfinite(top).all()
    valid = np.argwhere(mask == 1)[0]
    hidden[valid[0], valid[1], 0] = torch.nan
    _, top = gate_term(hidden, batch["attention_mask"], gate, torch.as_tensor(weights[0]), 0)
    assert torch.isnan(top[valid[0]]) and torch.isfinite(top[1 - valid[0]])
