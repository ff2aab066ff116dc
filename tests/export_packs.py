"""Steering packs for the exporter tests, made directly (no calibration run) for a tiny random model.

The vectors are random unit vectors; the gate bias is chosen so that the exporter's two validation prompts split
(one fires, one doesn't): minus the midpoint of their projections on the gate direction. That is computed with the
independent PyTorch reference, so a test never chooses it from the graph under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def splitting_bias(model, tokenizer, gate_layer: int, direction: np.ndarray, padding_side: str = "left") -> float:
    from aligner_export.hf.modeling import chat_texts, tokenize_batch
    from aligner_export.hf.reference import score_prompts
    from aligner_runtime.contract import SteerConfig
    from aligner_export.hf.validate import PROMPTS

    texts, _, _ = chat_texts(tokenizer, list(PROMPTS))
    batch = tokenize_batch(tokenizer, texts, padding_side=padding_side)
    spec = SteerConfig.single_layer(gate_layer, direction, 0.0, {gate_layer: np.zeros_like(direction)})
    _, score = score_prompts(model, spec, batch["input_ids"], batch["attention_mask"])
    return float(-score.mean())


def splitting_linear_bias(model, tokenizer, gate, padding_side: str = "left") -> float:
    """Minus the midpoint of the validation prompts' scores under a fitted (version-2 or 3) ``gate`` with bias 0."""
    from dataclasses import replace

    from aligner_export.hf.modeling import chat_texts, tokenize_batch
    from aligner_export.hf.reference import score_prompts
    from aligner_export.hf.validate import PROMPTS
    from aligner_runtime.contract import SteerConfig

    texts, _, _ = chat_texts(tokenizer, list(PROMPTS))
    batch = tokenize_batch(tokenizer, texts, padding_side=padding_side)
    config = SteerConfig(replace(gate, bias=0.0), {gate.last_layer: np.zeros(model.config.hidden_size, np.float32)})
    _, score = score_prompts(model, config, batch["input_ids"], batch["attention_mask"])
    return float(-score.mean())


def make_pack(model_dir: Path, path: Path, gate_layer: int = 1, steer_layers=(1, 2), alpha: float = 4.0,
              seed: int = 0, fingerprint: str | None = None, bias: float | None = None,
              linear_gate: tuple | None = None, pooled_gate: tuple | None = None) -> Path:
    """Writes a pack for ``model_dir`` whose ``paper`` bias splits the validation prompts; returns ``path``.
    ``linear_gate=(layers, tokens, normalize)`` adds a random version-2 gate whose bias splits them too;
    ``pooled_gate=(layers, tokens, normalize, max_scale)`` a random version-3 gate (issue 18) instead, its max weights
    ``max_scale`` times the pooled weights' scale."""
    from aligner_export.hf.modeling import fingerprint as model_fingerprint
    from aligner_export.hf.modeling import load_model
    from aligner_export.pack import SteeringPack, save_pack

    model, tokenizer = load_model(model_dir)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    rng = np.random.default_rng(seed)

    def unit_rows():
        rows = rng.normal(size=(layers, hidden)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    target_srv, aligned_srv = unit_rows(), unit_rows()
    biases = [splitting_bias(model, tokenizer, l, target_srv[l]) if bias is None else bias for l in range(layers)]
    per_layer = [{"layer": l, "target_val_accuracy": 1.0, "aligned_val_accuracy": 1.0, "bias_paper": biases[l],
                  "bias_fpr": biases[l] - 0.01, "val_tpr": 1.0, "val_fpr": 0.0} for l in range(layers)]
    digest = fingerprint or model_fingerprint(model)
    meta = {"mode": "cross-model", "target": {"fingerprint": digest, "source": str(model_dir),
                                              "chat_template_sha256": ""},
            "aligned": {"fingerprint": digest, "source": str(model_dir), "chat_template_sha256": ""},
            "prompts": {}, "per_layer": per_layer,
            "recommended": {"gate_layer": gate_layer, "steer_layers": list(steer_layers), "alpha": alpha,
                            "bias_rule": "paper"},
            "created_by": "tests"}
    zeros = np.zeros((layers, hidden), np.float32)
    gate_weight = None
    if linear_gate is not None:
        from aligner_runtime.contract import GateConfig

        gate_layers, tokens, normalize = linear_gate
        weights = rng.normal(size=(len(gate_layers), hidden)).astype(np.float32)
        gate = GateConfig(layers=tuple(gate_layers), weights=dict(zip(gate_layers, weights)), bias=0.0,
                          tokens=tokens, normalize=normalize, version=2, rule="linear")
        meta["gate"] = {"version": 2, "layers": list(gate_layers), "tokens": tokens, "normalize": normalize,
                        "bias": splitting_linear_bias(model, tokenizer, gate), "rule": "linear"}
        meta["recommended"]["gate"] = "linear"
        gate_weight = weights
    gate_max_weight = None
    if pooled_gate is not None:
        from aligner_runtime.contract import GateConfig

        gate_layers, tokens, normalize, max_scale = pooled_gate
        weights = rng.normal(size=(len(gate_layers), hidden)).astype(np.float32)
        max_weights = (max_scale * rng.normal(size=(len(gate_layers), hidden))).astype(np.float32)
        gate = GateConfig(layers=tuple(gate_layers), weights=dict(zip(gate_layers, weights)), bias=0.0,
                          tokens=tokens, normalize=normalize, version=3, rule="linear",
                          max_weights=dict(zip(gate_layers, max_weights)))
        meta["gate"] = {"version": 3, "layers": list(gate_layers), "tokens": tokens, "normalize": normalize,
                        "bias": splitting_linear_bias(model, tokenizer, gate), "rule": "linear"}
        meta["recommended"]["gate"] = "pooled"
        gate_weight, gate_max_weight = weights, max_weights
    save_pack(SteeringPack(target_srv, zeros, zeros, aligned_srv, meta, gate_weight, gate_max_weight), path)
    return path
