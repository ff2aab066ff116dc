"""Calibration: safety related vectors (SRVs) of the target and the aligned model, the gate, and a recommendation.

For each decoder layer ``l``, the residual stream at the layer's output (ARCHITECTURE.md §3) is taken at the last
prompt token of every chat-templated prompt. The SRV is the normalised difference of the harmful and harmless class
means over the calibration part of each prompt set; the validation part (``val_indices``) is held out to measure the
gate. See docs/calibration.md for the recommendation rules.
"""

from __future__ import annotations

import gc
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner_runtime.errors import AlignerError
from aligner_runtime.prompts import prompts_sha256

from aligner_export import __version__
from aligner_export.pack import BIAS_RULES, SteeringPack, save_pack

MIN_PROMPTS = 8
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
# Recommendation rules (docs/calibration.md).
STEER_UPPER_FRACTION = 0.4   # the steered block is drawn from this upper share of the decoder layers
STEER_ACCURACY_SLACK = 0.05  # ... where both models are within this of their best joint validation accuracy
# The shifts accumulate along the residual stream: after k steered layers the residual has moved by k * alpha.
# alpha is chosen so that the accumulated shift over the block is this fraction of the mean residual norm there.
ALPHA_NORM_FRACTION = 0.4


@dataclass
class Activations:
    """Last-prompt-token residuals ``[N, L, H]`` of one model for one prompt set."""

    values: np.ndarray
    chat_template_sha256: str
    used_fallback_template: bool


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(count)`` into (calibration, validation) indices, both sorted."""
    n_val = min(count - 2, max(2, int(round(count * val_fraction))))
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def collect_activations(model, tokenizer, prompts, batch_size: int = 16, desc: str = "") -> Activations:
    """Runs the prompts through ``model`` and returns the residual at every decoder layer's output."""
    import torch
    from tqdm import tqdm

    from aligner_export.hf.families import family_for, text_config
    from aligner_export.hf.modeling import chat_texts, tokenize_batch
    from aligner_export.hf.reference import last_positions

    texts, template_sha, fallback = chat_texts(tokenizer, prompts)
    layers = family_for(model.config).decoder_layers(model)
    num_layers, hidden = len(layers), text_config(model.config).hidden_size
    out = np.zeros((len(texts), num_layers, hidden), dtype=np.float32)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: less padding
    captured: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _args, output):
            hidden_states = output[0] if isinstance(output, tuple) else output
            batch, seq, _ = hidden_states.shape
            pos = last_positions(current["mask"], batch, seq)
            captured[layer] = hidden_states[torch.arange(batch), pos].float()
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), desc=desc or "activations", unit="batch",
                              file=sys.stderr, leave=False):
                idx = order[start:start + batch_size]
                batch = tokenize_batch(tokenizer, [texts[i] for i in idx], padding_side="left")
                current["mask"] = batch["attention_mask"]
                model(**batch, use_cache=False)
                stacked = torch.stack([captured[l] for l in range(num_layers)], dim=1).numpy()
                out[idx] = stacked
    finally:
        for handle in handles:
            handle.remove()
    bad = ~np.isfinite(out)
    if bad.any():
        prompt_i, layer_i, _ = np.argwhere(bad)[0]
        raise AlignerError(f"non-finite activations (NaN or inf) at layer {layer_i} for prompt {prompt_i} "
                           f"({desc}); the model or its dtype is unusable for calibration")
    return Activations(out, template_sha, fallback)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise AlignerError("a safety direction has zero length: the harmful and harmless means coincide")
    return (v / norm).astype(np.float32)


def srv_of(harmful: np.ndarray, harmless: np.ndarray):
    """Per-layer class means ``[L, H]`` and the unit SRV ``[L, H]`` from activations ``[N, L, H]``."""
    mean_harmful = harmful.mean(axis=0, dtype=np.float64).astype(np.float32)
    mean_harmless = harmless.mean(axis=0, dtype=np.float64).astype(np.float32)
    return mean_harmful, mean_harmless, _unit(mean_harmful.astype(np.float64) - mean_harmless)


def paper_bias(harmful_proj: np.ndarray, harmless_proj: np.ndarray) -> float:
    """Minus the mean projection of all calibration prompts (the paper's rule)."""
    return float(-np.concatenate([harmful_proj, harmless_proj]).mean(dtype=np.float64))


def fpr_bias(harmless_proj: np.ndarray, max_fpr: float) -> float:
    """The largest bias whose gate (``proj + bias > 0``) fires on at most ``max_fpr`` of the harmless prompts."""
    ranked = np.sort(harmless_proj.astype(np.float64))[::-1]
    allowed = int(np.floor(max_fpr * len(ranked)))
    return float(-ranked[min(allowed, len(ranked) - 1)])


def _rates(harmful_scores: np.ndarray, harmless_scores: np.ndarray) -> tuple[float, float, float]:
    tpr = float((harmful_scores > 0).mean())
    fpr = float((harmless_scores > 0).mean())
    accuracy = float(((harmful_scores > 0).sum() + (harmless_scores <= 0).sum())
                     / (len(harmful_scores) + len(harmless_scores)))
    return accuracy, tpr, fpr


def recommend(per_layer: list[dict], residual_norm: np.ndarray) -> dict:
    """Gate layer, steered block and alpha from the per-layer statistics (docs/calibration.md).

    - gate layer: the most accurate target layer on validation prompts with the recommended bias rule (ties: the
      larger class margin);
    - steered layers: the upper ``STEER_UPPER_FRACTION`` of the layers, trimmed from below until the first layer
      where both models are within ``STEER_ACCURACY_SLACK`` of their best joint validation accuracy (paper bias);
    - alpha: ``ALPHA_NORM_FRACTION`` times the mean last-token residual norm over the steered block, divided by the
      block's length: the shifts accumulate along the residual stream, so the total shift at the end of the block
      is that fraction of the residual it moves.
    """
    bias_rule = "fpr"
    gate_layer = max(per_layer, key=lambda s: (round(s[f"val_accuracy_{bias_rule}"], 6), s["margin"]))["layer"]
    num_layers = len(per_layer)
    joint = [min(s["target_val_accuracy"], s["aligned_val_accuracy"]) for s in per_layer]
    floor = max(joint) - STEER_ACCURACY_SLACK
    first = max(1, num_layers - int(np.ceil(STEER_UPPER_FRACTION * num_layers)))
    while first < num_layers - 1 and joint[first] < floor:
        first += 1
    steer_layers = list(range(first, num_layers))
    alpha = float(ALPHA_NORM_FRACTION * residual_norm[steer_layers].mean() / len(steer_layers))
    return {"gate_layer": int(gate_layer), "steer_layers": [int(l) for l in steer_layers],
            "alpha": round(alpha, 4), "bias_rule": bias_rule}


def calibrate(target_dir, harmful: list[str], harmless: list[str], aligned_dir=None, *, val_fraction: float = 0.25,
              seed: int = 0, max_fpr: float = 0.01, batch_size: int = 16, report_dir=None) -> SteeringPack:
    """Computes the steering pack. Loads one model at a time to bound memory."""
    from aligner_export.hf.modeling import fingerprint, load_model, model_dims

    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        if len(prompts) < MIN_PROMPTS:
            raise AlignerError(f"{name} prompt set has {len(prompts)} prompts; at least {MIN_PROMPTS} are needed")
    if not 0.0 <= max_fpr < 1.0:
        raise AlignerError(f"--max-fpr must be in [0, 1), got {max_fpr}")
    if not 0.0 < val_fraction < 1.0:
        raise AlignerError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    # A vision-language target is compared by its language model: the aligned model may be a text-only LM.
    target_dims = model_dims(target_dir)
    if aligned_dir is not None:
        aligned_dims = model_dims(aligned_dir)
        for key, a, t in zip(("num_hidden_layers", "hidden_size"), aligned_dims, target_dims):
            if a != t:
                raise AlignerError(f"aligned model's {key} is {a} but the target's is {t}: they must share a base")
    else:
        warnings.warn("no --aligned model: self mode, the target's own SRVs become the steering vectors "
                      "(the paper reports this works poorly)", stacklevel=2)

    harmful_cal, harmful_val = split_indices(len(harmful), val_fraction, seed)
    harmless_cal, harmless_val = split_indices(len(harmless), val_fraction, seed + 1)
    models = [("target", target_dir)] + ([("aligned", aligned_dir)] if aligned_dir is not None else [])
    acts: dict[str, tuple[Activations, Activations]] = {}
    info: dict[str, dict] = {}
    for role, path in models:
        model, tokenizer = load_model(path)
        h = collect_activations(model, tokenizer, harmful, batch_size, desc=f"{role} harmful")
        b = collect_activations(model, tokenizer, harmless, batch_size, desc=f"{role} harmless")
        acts[role] = (h, b)
        info[role] = {"fingerprint": fingerprint(model), "source": str(Path(path).resolve()),
                      "chat_template_sha256": h.chat_template_sha256,
                      "chat_template_fallback": h.used_fallback_template}
        del model, tokenizer
        gc.collect()

    stats = {}
    for role, (h, b) in acts.items():
        mean_h, mean_b, srv = srv_of(h.values[harmful_cal], b.values[harmless_cal])
        stats[role] = (mean_h, mean_b, srv)
    t_mean_h, t_mean_b, t_srv = stats["target"]
    a_srv = stats["aligned"][2] if "aligned" in stats else t_srv.copy()
    t_h, t_b = acts["target"][0].values, acts["target"][1].values
    residual_norm = np.linalg.norm(np.concatenate([t_h[harmful_cal], t_b[harmless_cal]]), axis=-1).mean(axis=0)

    per_layer = []
    gate_scores = {}
    for layer in range(t_srv.shape[0]):
        proj_h = t_h[:, layer] @ t_srv[layer]
        proj_b = t_b[:, layer] @ t_srv[layer]
        b_paper = paper_bias(proj_h[harmful_cal], proj_b[harmless_cal])
        b_fpr = fpr_bias(proj_b[harmless_cal], max_fpr)
        t_acc, tpr_paper, fpr_paper = _rates(proj_h[harmful_val] + b_paper, proj_b[harmless_val] + b_paper)
        acc_fpr, val_tpr, val_fpr = _rates(proj_h[harmful_val] + b_fpr, proj_b[harmless_val] + b_fpr)
        if "aligned" in acts:
            a_h, a_b = acts["aligned"][0].values, acts["aligned"][1].values
            ap_h, ap_b = a_h[:, layer] @ a_srv[layer], a_b[:, layer] @ a_srv[layer]
            a_bias = paper_bias(ap_h[harmful_cal], ap_b[harmless_cal])
            a_acc = _rates(ap_h[harmful_val] + a_bias, ap_b[harmless_val] + a_bias)[0]
        else:
            a_acc = t_acc
        spread = np.sqrt(0.5 * (proj_h[harmful_cal].var() + proj_b[harmless_cal].var())) + 1e-12
        margin = float((proj_h[harmful_cal].mean() - proj_b[harmless_cal].mean()) / spread)
        per_layer.append({"layer": layer, "target_val_accuracy": t_acc, "aligned_val_accuracy": a_acc,
                          "bias_paper": b_paper, "bias_fpr": b_fpr, "val_tpr": val_tpr, "val_fpr": val_fpr,
                          "val_tpr_paper": tpr_paper, "val_fpr_paper": fpr_paper,
                          "val_accuracy_paper": t_acc, "val_accuracy_fpr": acc_fpr, "margin": margin,
                          "residual_norm": float(residual_norm[layer])})
        gate_scores[layer] = (proj_h, proj_b)

    recommended = recommend(per_layer, residual_norm)
    meta = {
        "mode": "cross-model" if "aligned" in acts else "self",
        "target": info["target"],
        "aligned": info.get("aligned", dict(info["target"], note="self mode: copy of the target")),
        "prompts": {
            "harmful": {"count": len(harmful), "sha256": prompts_sha256(harmful),
                        "val_indices": [int(i) for i in harmful_val]},
            "harmless": {"count": len(harmless), "sha256": prompts_sha256(harmless),
                         "val_indices": [int(i) for i in harmless_val]},
        },
        "per_layer": per_layer,
        "recommended": recommended,
        "max_fpr": max_fpr,
        "seed": seed,
        "created_by": f"inferaligner-edge {__version__}",
    }
    pack = SteeringPack(t_srv, t_mean_h, t_mean_b, a_srv.astype(np.float32), meta)
    if report_dir is not None:
        from aligner_export.hf.report import write_calibration_report

        g = recommended["gate_layer"]
        write_calibration_report(report_dir, pack, gate_scores[g], (harmful_cal, harmful_val),
                                 (harmless_cal, harmless_val))
    return pack


__all__ = ["calibrate", "collect_activations", "save_pack", "BIAS_RULES", "split_indices"]
