"""Calibration: safety related vectors (SRVs) of the target and the aligned model, the gate, and a recommendation.

For each decoder layer ``l``, the residual stream at the layer's output (docs/architecture.md §3) is taken at the last
prompt token of every chat-templated prompt. The SRV is the normalised difference of the harmful and harmless class
means over the calibration part of each prompt set; the validation part (``val_indices``) is held out to measure the
paper's one-direction gate per layer. The linear gate (§5.1, issue 10) is fitted on the target's residuals at the last
``K`` prompt tokens of candidate gate layers, over the prompt sets plus the wrapped and rewritten prompts
(``aligner_export.gate``). The aligned model only supplies the steering vectors, so it sees a bounded share of the
prompts. See docs/calibration.md for the rules.
"""

from __future__ import annotations

import gc
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner_runtime.contract import (ATTENTION_MASK, DEFAULT_SHIFT_MODE, INPUT_IDS, PACK_GATES, SSV_MODES,
                                      EndRuleKey, gate_kind, gate_kind_named, position_ids)
from aligner_runtime.contract.pack import LayerStatsKey, ModelInfoKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError
from aligner_runtime.prompts import prompts_sha256

from aligner_export import __version__
from aligner_export.corpus import Record
from aligner_export.gate import (DEFAULT_OBJECTIVE, MAX_TOKEN_BYTES, NORM_EPS, OBJECTIVES, POOLED_KIND, POOLED_VERSION,
                                 THRESHOLD_RULES, Features, TokenCollector, default_candidates, fit_gate)
from aligner_export.hf.families import family_for, text_config
from aligner_export.hf.modeling import chat_texts, fingerprint, load_model, model_dims, tokenize_batch
from aligner_export.hf.report import write_calibration_report
from aligner_export.hf.responses import RESPONSE_PROMPTS, cached_answers, response_srv
from aligner_export.pack import BIAS_RULES, SteeringPack, save_pack

MIN_PROMPTS = 8
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
# Recommendation rules (docs/calibration.md).
STEER_UPPER_FRACTION = 0.4   # the steered block is drawn from this upper share of the decoder layers
STEER_ACCURACY_SLACK = 0.05  # ... where both models are within this of their best joint validation accuracy
# The shifts accumulate along the residual stream: after k steered layers the residual has moved by k * alpha.
# alpha is chosen so that the accumulated shift over the block is this fraction of the mean residual norm there.
ALPHA_NORM_FRACTION = 0.4
BATCH_TOKENS = 4096  # padded tokens per forward batch
TAIL_TOKENS = 4  # residual positions kept per prompt at the candidate gate layers (the largest K searched)
ALIGNED_MAX = 400  # prompts per class the aligned model sees (its class means only need to settle)
# Response-derived steering vectors (issue 17; docs/calibration.md "Steering vectors", hf/responses.py): the kinds
# (contract.SSV_MODES) whose vectors come from answers rather than prompts.
RESPONSE_SSVS = ("response", "response-compliant")
# Where response vectors steer: the middle band of the decoder, [RESPONSE_BLOCK[0]·L, RESPONSE_BLOCK[1]·L). The
# refusal behaviour is written there; the upper layers that carry the prompt SRV's class signal mostly turn the
# answer's topic (the sweep in docs/calibration.md).
RESPONSE_BLOCK = (1 / 3, 0.74)
# The recommended end rule (docs/contract.md "Ending a steered answer"): an end-of-sequence bonus of END_SLOPE per
# token after END_AFTER tokens of a steered answer.
END_AFTER, END_SLOPE = 8, 1.0


@dataclass
class Activations:
    """Per prompt: the last-token residual ``[N, L, H]`` at every layer, and the last ``TAIL_TOKENS`` positions at the
    candidate gate layers ``[N, len(tail_layers), TAIL_TOKENS, H]`` (float16) when asked for; for the pooled gate,
    every prompt token at ``token_layers`` (:class:`~aligner_export.gate.TokenFeatures`)."""

    values: np.ndarray
    chat_template_sha256: str
    used_fallback_template: bool
    tails: np.ndarray | None = None
    lengths: np.ndarray | None = None
    tokens: object | None = None  # aligner_export.gate.TokenFeatures


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(count)`` into (calibration, validation) indices, both sorted."""
    n_val = min(count - 2, max(2, int(round(count * val_fraction))))
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _batches(lengths: np.ndarray, max_rows: int, max_tokens: int):
    """Index batches in ascending length with at most ``max_rows`` rows and ``max_tokens`` padded tokens."""
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_rows and (end + 1 - start) * lengths[order[end]] <= max_tokens:
            end += 1
        yield order[start:end]
        start = end


def collect_activations(model, tokenizer, prompts, batch_size: int = 16, desc: str = "", tail_layers=(),
                        systems=None, batch_tokens: int = BATCH_TOKENS, token_layers=(), seed: int = 0,
                        token_limit: int = MAX_TOKEN_BYTES) -> Activations:
    """Runs the prompts through the decoder stack of ``model`` (no LM head) and returns the residual at every
    decoder layer's output at the last token, at ``tail_layers`` the last ``TAIL_TOKENS`` positions, and at
    ``token_layers`` every valid position's normalised residual as principal coordinates (the pooled gate; the
    memory is checked against ``token_limit`` before anything is allocated, and the batches then run in a shuffled
    order so that the basis sample spans the prompt lengths)."""
    # deferred: torch, the model run's own import (the package imports without it)
    import torch
    # deferred: tqdm (the export extra): aligner-export's parser imports this module in a device install
    from tqdm import tqdm

    family = family_for(model.config)
    texts, template_sha, fallback = chat_texts(tokenizer, prompts, systems=systems)
    layers = family.decoder_layers(model)
    num_layers, hidden = len(layers), text_config(model.config).hidden_size
    out = np.zeros((len(texts), num_layers, hidden), dtype=np.float32)
    tail_layers = list(tail_layers)
    tails = np.zeros((len(texts), len(tail_layers), TAIL_TOKENS, hidden), np.float16) if tail_layers else None
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)[INPUT_IDS]])
    if tail_layers and lengths.min() < TAIL_TOKENS:
        raise AlignerError(f"a chat-templated prompt has {lengths.min()} tokens; the gate needs {TAIL_TOKENS}")
    token_layers = list(token_layers)
    collector = TokenCollector(token_layers, lengths, hidden, limit=token_limit, seed=seed) if token_layers else None
    decoder = family.language_model(model).model  # the decoder stack alone: the LM head's logits are not needed
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    batches = list(_batches(lengths, batch_size, batch_tokens))
    if collector is not None:  # each batch is computed alone: their order changes no value, only the basis sample
        batches = [batches[i] for i in np.random.default_rng(seed).permutation(len(batches))]
    try:
        with torch.inference_mode():
            for idx in tqdm(batches, desc=desc or "activations", unit="batch", file=sys.stderr, leave=False,
                            disable=None):
                batch = tokenize_batch(tokenizer, [texts[i] for i in idx], padding_side="left")
                mask = batch[ATTENTION_MASK]
                decoder(input_ids=batch[INPUT_IDS], attention_mask=mask,
                        position_ids=torch.from_numpy(position_ids(mask.numpy())), use_cache=False)
                # Left padding: every row's last token is the last column.
                out[idx] = torch.stack([captured[l][:, -1] for l in range(num_layers)], dim=1).float().numpy()
                for j, layer in enumerate(tail_layers):
                    tails[idx, j] = captured[layer][:, -TAIL_TOKENS:].float().numpy().astype(np.float16)
                if collector is not None:
                    units = []
                    for layer in token_layers:
                        h = captured[layer].float()
                        units.append((h / h.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)).numpy())
                    width, valid = mask.shape[1], mask.sum(dim=1).numpy()
                    for r, i in enumerate(idx):
                        collector.add(int(i), [u[r, width - int(valid[r]):] for u in units])
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    bad = ~np.isfinite(out)
    if bad.any():
        prompt_i, layer_i, _ = np.argwhere(bad)[0]
        raise AlignerError(f"non-finite activations (NaN or inf) at layer {layer_i} for prompt {prompt_i} "
                           f"({desc}); the model or its dtype is unusable for calibration")
    return Activations(out, template_sha, fallback, tails, lengths,
                       collector.finish() if collector is not None else None)


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
    gate_layer = max(per_layer, key=lambda s: (round(s[LayerStatsKey.val_accuracy(bias_rule)], 6),
                                               s[LayerStatsKey.MARGIN]))[LayerStatsKey.LAYER]
    num_layers = len(per_layer)
    joint = [min(s[LayerStatsKey.TARGET_VAL_ACCURACY], s[LayerStatsKey.ALIGNED_VAL_ACCURACY]) for s in per_layer]
    floor = max(joint) - STEER_ACCURACY_SLACK
    first = max(1, num_layers - int(np.ceil(STEER_UPPER_FRACTION * num_layers)))
    while first < num_layers - 1 and joint[first] < floor:
        first += 1
    steer_layers = list(range(first, num_layers))
    alpha = float(ALPHA_NORM_FRACTION * residual_norm[steer_layers].mean() / len(steer_layers))
    return {RecommendedKey.GATE_LAYER: int(gate_layer), RecommendedKey.STEER_LAYERS: [int(l) for l in steer_layers],
            RecommendedKey.ALPHA: round(alpha, 4), RecommendedKey.BIAS_RULE: bias_rule}


def _records(prompts, name: str, cls: str) -> list[Record]:
    """Prompt sets given as strings (a user's files) become records of one source each."""
    return [p if isinstance(p, Record) else Record(text=p, source=name, role="calibration", cls=cls) for p in prompts]


def _cap(indices: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(indices, size=cap, replace=False)) if cap and indices.size > cap else indices


def _texts(records) -> tuple[list[str], list[str | None]]:
    return [r.prompt for r in records], [r.system for r in records]


def _check_options(harmful, harmless, gate: str, max_fpr: float, max_fpr_borderline: float, val_fraction: float,
                   batch_size: int) -> None:
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        if len(prompts) < MIN_PROMPTS:
            raise AlignerError(f"{name} prompt set has {len(prompts)} prompts; at least {MIN_PROMPTS} are needed")
    if gate not in PACK_GATES:
        raise AlignerError(f"--gate must be one of {', '.join(PACK_GATES)}, got {gate!r}")
    for flag, value in (("--max-fpr", max_fpr), ("--max-fpr-borderline", max_fpr_borderline)):
        if not 0.0 <= value < 1.0:
            raise AlignerError(f"{flag} must be in [0, 1), got {value}")
    if not 0.0 < val_fraction < 1.0:
        raise AlignerError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1024:
        raise AlignerError(f"--batch-size must be an integer in [1, 1024], got {batch_size!r}")


def calibrate(target_dir, harmful, harmless, aligned_dir=None, *, extras=(), gate: str = "linear",
              val_fraction: float = 0.25, seed: int = 0, max_fpr: float = 0.02, max_fpr_borderline: float = 0.10,
              batch_size: int = 64, report_dir=None, candidates=None, aligned_max: int = ALIGNED_MAX,
              ssv: str | None = None, response_cache: Path | None = None, target_cache: Path | None = None,
              threshold_rule: str = "generic", objective: str = DEFAULT_OBJECTIVE,
              log=lambda *_: None) -> SteeringPack:
    """Computes the steering pack. Loads one model at a time to bound memory.

    ``harmful`` and ``harmless`` (strings or :class:`~aligner_export.corpus.Record`) give the SRVs and the gate's
    positives and negatives; ``extras`` (records: wrapped and rewritten prompts of both labels) train the linear gate
    only. ``gate="paper"`` fits no linear gate (a format-1-style pack, exported with ``--gate paper``).
    ``ssv="response"`` (the default with an aligned model) takes the steering vectors from the aligned model's own
    refusals and helpful answers (:func:`~aligner_export.hf.responses.response_srv`, its answers cached in
    ``response_cache``); ``"response-compliant"`` from its refusals and the target's compliant answers to the same
    harmful prompts (the target's answers cached in ``target_cache``); ``"prompt"`` is the paper's prompt-activation
    SRV."""
    harmful = _records(harmful, "harmful", "harmful")
    harmless = _records(harmless, "harmless", "harmless")
    extras = list(extras)
    _check_options(harmful, harmless, gate, max_fpr, max_fpr_borderline, val_fraction, batch_size)
    fitted_kind = gate_kind_named(gate).pack_weights  # a kind whose weights calibration fits and the pack stores
    if threshold_rule not in THRESHOLD_RULES:
        raise AlignerError(f"--threshold-rule must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
    if objective not in OBJECTIVES:
        raise AlignerError(f"--gate-objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    # Default: response vectors where the aligned model refuses in words the judge knows; else the prompt vectors.
    auto = ssv is None
    if ssv is None:
        ssv = "response" if aligned_dir is not None else "prompt"
    if ssv not in SSV_MODES:
        raise AlignerError(f"--ssv must be one of {', '.join(SSV_MODES)}, got {ssv!r}")
    if ssv in RESPONSE_SSVS and aligned_dir is None:
        raise AlignerError(f"--ssv {ssv} needs an --aligned model (its own refusals give the vectors)")
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
    num_layers = target_dims[0]
    if fitted_kind:
        candidates = list(candidates) if candidates else default_candidates(num_layers)
        tail_layers = sorted({l for c in candidates for l in c.layers})
    else:
        candidates, tail_layers = [], []

    harmful_cal, harmful_val = split_indices(len(harmful), val_fraction, seed)
    harmless_cal, harmless_val = split_indices(len(harmless), val_fraction, seed + 1)
    everything = harmful + harmless + extras
    n_h, n_b = len(harmful), len(harmless)

    pick_h = _cap(harmful_cal, RESPONSE_PROMPTS, np.random.default_rng(seed + 3))  # the answered harmful prompts

    log(f"target: {len(everything)} prompts ({n_h} harmful, {n_b} harmless, {len(extras)} wrapped or rewritten)")
    model, tokenizer = load_model(target_dir)
    texts, systems = _texts(everything)
    pooled = gate == POOLED_KIND  # the max term reads every prompt token at the candidate layers
    target = collect_activations(model, tokenizer, texts, batch_size, "target", tail_layers, systems,
                                 token_layers=tail_layers if pooled else (), seed=seed)
    target_answers = None
    if ssv == "response-compliant":  # the target's own answers to the harmful prompts the aligned model answers
        target_answers = cached_answers(model, tokenizer, {"harmful": [harmful[i].prompt for i in pick_h]},
                                        target_cache, log, "target")["harmful"]
    info = {PackKey.TARGET: {ModelInfoKey.FINGERPRINT: fingerprint(model),
                             ModelInfoKey.SOURCE: str(Path(target_dir).resolve()),
                             ModelInfoKey.CHAT_TEMPLATE_SHA256: target.chat_template_sha256,
                             ModelInfoKey.CHAT_TEMPLATE_FALLBACK: target.used_fallback_template}}
    del model, tokenizer
    gc.collect()
    t_h, t_b = target.values[:n_h], target.values[n_h:n_h + n_b]
    # The SRVs compare harmful with harmless prompts of the same lengths: harmful requests are short, and a
    # difference of means over long harmless instructions points at "short prompt" as much as at "harmful" (the
    # steering vectors of such a pack do not make the model refuse; docs/calibration.md).
    length_h, length_b = target.lengths[:n_h], target.lengths[n_h:n_h + n_b]
    length_cap = int(np.percentile(length_h[harmful_cal], 95))
    srv_harmless = harmless_cal[length_b[harmless_cal] <= length_cap]
    if srv_harmless.size < MIN_PROMPTS:
        srv_harmless = harmless_cal

    aligned_rows = None
    if aligned_dir is not None:
        rng = np.random.default_rng(seed + 2)
        val_short = harmless_val[length_b[harmless_val] <= length_cap]
        rows_h = np.concatenate([_cap(harmful_cal, aligned_max, rng), _cap(harmful_val, aligned_max // 2, rng)])
        rows_b = np.concatenate([_cap(srv_harmless, aligned_max, rng),
                                 _cap(val_short if val_short.size >= 2 else harmless_val, aligned_max // 2, rng)])
        log(f"aligned: {len(rows_h) + len(rows_b)} prompts")
        model, tokenizer = load_model(aligned_dir)
        texts, systems = _texts([harmful[i] for i in rows_h] + [harmless[i] for i in rows_b])
        aligned = collect_activations(model, tokenizer, texts, batch_size, "aligned", (), systems)
        info[PackKey.ALIGNED] = {ModelInfoKey.FINGERPRINT: fingerprint(model),
                                 ModelInfoKey.SOURCE: str(Path(aligned_dir).resolve()),
                                 ModelInfoKey.CHAT_TEMPLATE_SHA256: aligned.chat_template_sha256,
                                 ModelInfoKey.CHAT_TEMPLATE_FALLBACK: aligned.used_fallback_template,
                                 ModelInfoKey.PROMPTS: {"harmful": int(len(rows_h)), "harmless": int(len(rows_b))}}
        if ssv in RESPONSE_SSVS:
            pick_b = _cap(srv_harmless, RESPONSE_PROMPTS, np.random.default_rng(seed + 4))
            try:
                response_steer, info["response_ssv"] = response_srv(
                    model, tokenizer, [harmful[i].prompt for i in pick_h], [harmless[i].prompt for i in pick_b],
                    tokenizer.eos_token or "", response_cache, log, compliant=target_answers)
            except AlignerError as exc:
                if not auto:
                    raise
                warnings.warn(f"{exc}; the prompt vectors are used instead", stacklevel=2)
                ssv = "prompt"
                info["response_ssv"] = {"ssv": "prompt", "fallback": str(exc)}
        del model, tokenizer
        gc.collect()
        aligned_rows = (rows_h, rows_b, aligned.values[:len(rows_h)], aligned.values[len(rows_h):])

    t_mean_h, t_mean_b, t_srv = srv_of(t_h[harmful_cal], t_b[srv_harmless])
    if aligned_rows is not None:
        rows_h, rows_b, a_h, a_b = aligned_rows
        a_cal_h, a_cal_b = np.isin(rows_h, harmful_cal), np.isin(rows_b, harmless_cal)
        a_srv = srv_of(a_h[a_cal_h], a_b[a_cal_b])[2]
    else:
        a_srv = t_srv.copy()
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
        if aligned_rows is not None:
            ap_h, ap_b = a_h[:, layer] @ a_srv[layer], a_b[:, layer] @ a_srv[layer]
            a_bias = paper_bias(ap_h[a_cal_h], ap_b[a_cal_b])
            a_acc = _rates(ap_h[~a_cal_h] + a_bias, ap_b[~a_cal_b] + a_bias)[0]
        else:
            a_acc = t_acc
        spread = np.sqrt(0.5 * (proj_h[harmful_cal].var() + proj_b[harmless_cal].var())) + 1e-12
        margin = float((proj_h[harmful_cal].mean() - proj_b[harmless_cal].mean()) / spread)
        per_layer.append({LayerStatsKey.LAYER: layer, LayerStatsKey.TARGET_VAL_ACCURACY: t_acc,
                          LayerStatsKey.ALIGNED_VAL_ACCURACY: a_acc, LayerStatsKey.bias("paper"): b_paper,
                          LayerStatsKey.bias("fpr"): b_fpr, LayerStatsKey.VAL_TPR: val_tpr,
                          LayerStatsKey.VAL_FPR: val_fpr, "val_tpr_paper": tpr_paper, "val_fpr_paper": fpr_paper,
                          LayerStatsKey.val_accuracy("paper"): t_acc, LayerStatsKey.val_accuracy("fpr"): acc_fpr,
                          LayerStatsKey.MARGIN: margin,
                          LayerStatsKey.RESIDUAL_NORM: float(residual_norm[layer])})
        gate_scores[layer] = (proj_h, proj_b)

    recommended = recommend(per_layer, residual_norm)
    recommended[RecommendedKey.SSV] = ssv
    steer_srv = a_srv
    if ssv in RESPONSE_SSVS:
        # The response vectors steer the middle band (RESPONSE_BLOCK), at the same accumulated-shift rule for alpha,
        # and the answer ends by the end rule (docs/calibration.md "Steering vectors").
        steer_srv = response_steer
        first = int(np.ceil(RESPONSE_BLOCK[0] * num_layers))
        last = max(first + 1, int(RESPONSE_BLOCK[1] * num_layers))
        block = list(range(first, last))
        recommended[RecommendedKey.STEER_LAYERS] = block
        recommended[RecommendedKey.ALPHA] = round(float(ALPHA_NORM_FRACTION * residual_norm[block].mean()
                                                        / len(block)), 4)
    recommended[RecommendedKey.END_RULE] = {EndRuleKey.AFTER: END_AFTER, EndRuleKey.SLOPE: END_SLOPE}
    # The paper's additive shift; `aligner-export export --shift-mode norm` rescales instead (docs/calibration.md).
    recommended[RecommendedKey.SHIFT_MODE] = DEFAULT_SHIFT_MODE  # the pack names it as the manifest does
    gate_weight = gate_max_weight = gate_meta = gate_report = None
    if fitted_kind:
        features = Features(tails=target.tails, layers=tuple(tail_layers),
                            labels=np.array([r.label for r in everything]),
                            classes=np.array([r.cls for r in everything]),
                            sources=np.array([r.source for r in everything]),
                            rewrites=np.array([(r.rewrite or ":").split(":")[0] for r in everything]))

        def progress(done, total, candidate, result):
            log(f"gate candidate {done}/{total}: {candidate.describe()}: leave-one-source-out TPR mean "
                f"{result['mean_tpr']:.3f}, worst {result['min_tpr']:.3f}")

        fitted, gate_report = fit_gate(features, candidates, max_fpr, max_fpr_borderline, seed=seed,
                                       progress=progress, threshold_rule=threshold_rule, tokens=target.tokens,
                                       objective=objective,
                                       log=log)
        try:  # the one check of a gate's shape rules (contract.GateConfig.check), before the pack records it
            fitted.check(num_layers, int(t_srv.shape[1]))
        except ValueError as exc:
            raise AlignerError(f"the fitted gate: {exc}") from None
        gate_weight = np.stack([fitted.weights[l] for l in fitted.layers]).astype(np.float32)
        if fitted.version == POOLED_VERSION:  # the max term's u_l beside w_l (SteeringPack.gate_max_weight)
            gate_max_weight = np.stack([fitted.max_weights[l] for l in fitted.layers]).astype(np.float32)
        chosen = gate_report.candidate
        # The gate's own record (GateConfig.manifest: the manifest's gate object) and how it was fitted.
        gate_meta = {**fitted.manifest(),
                     "fit": "logistic-l2+max" if fitted.version == POOLED_VERSION else "logistic-l2",
                     "C": chosen.C, PackKey.MAX_FPR: max_fpr,
                     "max_fpr_borderline": max_fpr_borderline, "threshold_rule": threshold_rule,
                     "objective": objective,
                     "heldout": gate_report.heldout,
                     "loso": [{k: v for k, v in r.items() if k != "folds"} | {"folds": r["folds"]}
                              for r in gate_report.loso],
                     "sources": _source_counts(everything)}
        if gate_report.pooled is not None:  # --gate pooled: its folds against the linear gate's, and which was kept
            gate_meta[POOLED_KIND] = gate_report.pooled
        # The kind fitted: --gate pooled keeps the linear gate where the max term does not validate better.
        recommended[RecommendedKey.GATE] = gate_kind(fitted.version).pack_name
    meta = {
        PackKey.MODE: "cross-model" if aligned_dir is not None else "self",
        PackKey.SSV: info.get("response_ssv", {"ssv": "prompt"}),
        PackKey.TARGET: info[PackKey.TARGET],
        PackKey.ALIGNED: info.get(PackKey.ALIGNED, dict(info[PackKey.TARGET], note="self mode: copy of the target")),
        PackKey.PROMPTS: {
            "harmful": {"count": n_h, "sha256": prompts_sha256([r.prompt for r in harmful]),
                        "val_indices": [int(i) for i in harmful_val]},
            "harmless": {"count": n_b, "sha256": prompts_sha256([r.prompt for r in harmless]),
                         "val_indices": [int(i) for i in harmless_val]},
            "extras": {"count": len(extras), "sha256": prompts_sha256([r.prompt for r in extras])},
            "srv_length_cap": length_cap, "srv_harmless_count": int(srv_harmless.size),
        },
        PackKey.PER_LAYER: per_layer,
        PackKey.RECOMMENDED: recommended,
        PackKey.MAX_FPR: max_fpr,
        PackKey.SEED: seed,
        PackKey.CREATED_BY: f"inferaligner-edge {__version__}",
    }
    if gate_meta is not None:
        meta[PackKey.GATE] = gate_meta
    extra = {} if gate_max_weight is None else {"gate_max_weight": gate_max_weight}  # gate version 3 only
    pack = SteeringPack(t_srv, t_mean_h, t_mean_b, steer_srv.astype(np.float32), meta, gate_weight, **extra)
    if report_dir is not None:
        g = recommended[RecommendedKey.GATE_LAYER]
        write_calibration_report(report_dir, pack, gate_scores[g], (harmful_cal, harmful_val),
                                 (harmless_cal, harmless_val), gate_report)
    return pack


def _source_counts(records) -> dict:
    counts: dict = {}
    for r in records:
        key = f"{r.cls}:{r.source}" + (f":{r.rewrite.split(':')[0]}" if r.rewrite else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["calibrate", "collect_activations", "save_pack", "BIAS_RULES", "split_indices"]
