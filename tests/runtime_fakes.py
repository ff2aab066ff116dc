"""TEST DOUBLE: a toy numpy "model" that honours the exported graph's I/O contract (docs/architecture.md §5).

It exists only to test the run-time's generation loop (padding, KV cache, positions, the two-pass prefill, the gate
fed back) without an exporter or ONNX Runtime. It is not a transformer: each of its two "layers" is a causal masked
mean over the visible positions, which is enough to make every bookkeeping mistake (a wrong mask, a wrong position,
a stale cache, an unsteered decode step) change the logits.

    layer 0: cache x = emb[token] + pos_emb[position];  h0 = masked causal mean of x;  h0 += max(gate_in, 0) * v0
    layer 1: cache h0;  h1 = masked causal mean of h0;  SteerGate on h1 (gate layer 1);  h1 += gate * v1
    logits = h1 @ w_out
"""

from __future__ import annotations

import numpy as np

VOCAB, HEADS, HEAD_DIM = 40, 2, 3
HIDDEN = HEADS * HEAD_DIM
MAX_POS = 64


class ToyModel:
    def __init__(self, seed: int = 0, bias: float = 0.0, with_position_ids: bool = True, steered: bool = True):
        rng = np.random.default_rng(seed)
        self.emb = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
        self.pos_emb = rng.normal(scale=0.5, size=(MAX_POS, HIDDEN)).astype(np.float32)
        self.w_out = rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32)
        direction = rng.normal(size=HIDDEN)
        self.direction = (direction / np.linalg.norm(direction)).astype(np.float32)
        self.bias = np.float32(bias)
        self.v0 = rng.normal(scale=2.0, size=HIDDEN).astype(np.float32)
        self.v1 = rng.normal(scale=2.0, size=HIDDEN).astype(np.float32)
        self.with_position_ids = with_position_ids
        self.steered = steered
        self.calls: list[dict] = []

    # --- the backend protocol ---------------------------------------------------------------------------------------
    @property
    def input_names(self):
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.with_position_ids else [])
        names += [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
        return names + (["steer_gate_in"] if self.steered else [])

    @property
    def output_names(self):
        names = ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
        return names + (["steer_gate", "steer_score"] if self.steered else [])

    vocab_size = VOCAB

    def past_spec(self, name):
        return HEADS, HEAD_DIM, np.dtype(np.float32)

    def _run(self, feeds):
        assert set(feeds) == set(self.input_names), sorted(feeds)
        self.calls.append({k: v.copy() for k, v in feeds.items()})
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64
        batch, seq = ids.shape
        past_len = feeds["past_key_values.0.key"].shape[2]
        assert mask.shape == (batch, past_len + seq)
        if self.with_position_ids:
            positions = feeds["position_ids"]
        else:  # what a graph without position_ids computes internally
            positions = (np.cumsum(mask, axis=1) - 1)[:, past_len:]
        gate_in = feeds["steer_gate_in"] if self.steered else np.zeros(batch, np.float32)
        assert gate_in.dtype == np.float32 and gate_in.shape == (batch,)

        x = self.emb[ids] + self.pos_emb[np.clip(positions, 0, MAX_POS - 1)]
        cache0 = np.concatenate([self._unheads(feeds["past_key_values.0.key"]), x], axis=1)
        h0 = self._causal_mean(cache0, mask, past_len) + np.maximum(gate_in, 0)[:, None, None] * self.v0
        cache1 = np.concatenate([self._unheads(feeds["past_key_values.1.key"]), h0], axis=1)
        h1 = self._causal_mean(cache1, mask, past_len)
        # SteerGate (§5): last_b is the last position of this call whose mask is 1.
        call_mask = mask[:, past_len:]
        last = seq - 1 - np.argmax(call_mask[:, ::-1], axis=1)
        score = (h1[np.arange(batch), last].astype(np.float32) @ self.direction + self.bias).astype(np.float32)
        gate = np.where(gate_in >= 0, gate_in, (score > 0).astype(np.float32)).astype(np.float32)
        h1 = h1 + gate[:, None, None] * self.v1
        out = {"logits": (h1 @ self.w_out).astype(np.float32)}
        for i, cache in ((0, cache0), (1, cache1)):
            out[f"present.{i}.key"] = self._heads(cache)
            out[f"present.{i}.value"] = self._heads(cache) * 2
        if self.steered:
            out["steer_gate"], out["steer_score"] = gate, score
        return out

    # --- helpers ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _heads(x):  # [B,T,H] -> [B,heads,T,hd]
        b, t, _ = x.shape
        return np.ascontiguousarray(x.reshape(b, t, HEADS, HEAD_DIM).transpose(0, 2, 1, 3))

    @staticmethod
    def _unheads(x):
        b, _, t, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, t, HIDDEN)

    @staticmethod
    def _causal_mean(cache, mask, past_len):
        batch, total, _ = cache.shape
        seq = total - past_len
        out = np.zeros((batch, seq, HIDDEN), np.float32)
        for s in range(seq):
            visible = mask[:, : past_len + s + 1].astype(np.float32)
            denom = np.maximum(visible.sum(axis=1, keepdims=True), 1.0)
            out[:, s] = (cache[:, : past_len + s + 1] * visible[:, :, None]).sum(axis=1) / denom
        return out


def reference_greedy(model: ToyModel, prompt: list[int], max_new_tokens: int, stop=(), gate_off=False):
    """Independent oracle: no cache, no padding, full recompute each step with the gate latched at the prompt.

    Returns ``(tokens, gate, score, step_logits)``.
    """
    def forward(ids, gate_in):
        seq = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, seq), np.int64)}
        if model.with_position_ids:
            feeds["position_ids"] = np.arange(seq, dtype=np.int64)[None]
        for i in range(2):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, HEADS, 0, HEAD_DIM), np.float32)
        if model.steered:
            feeds["steer_gate_in"] = np.asarray([gate_in], np.float32)
        return model._run(feeds)

    first = forward(prompt, 0.0 if gate_off else -1.0)
    gate = float(first["steer_gate"][0]) if model.steered else 0.0
    score = float(first["steer_score"][0]) if model.steered else None
    tokens, step_logits, ids = [], [], list(prompt)
    for _ in range(max_new_tokens):
        logits = forward(ids, gate)["logits"][0, -1]
        step_logits.append(logits)
        token = int(np.argmax(logits))
        tokens.append(token)
        ids.append(token)
        if token in stop:
            break
    return tokens, gate, score, step_logits
