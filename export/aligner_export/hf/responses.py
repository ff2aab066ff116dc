"""Response-derived steering vectors (issue 17; docs/calibration.md "Steering vectors from responses").

A model's greedy answers to calibration prompts (:func:`generate_answers`, kept in a cache by
:func:`cached_answers`), each decoder layer's output averaged over an answer's tokens (:func:`answer_residuals`), and
the unit difference of two such means (:func:`response_srv`): the aligned model's residuals over its own refusals
minus, for ``--ssv response``, its residuals over its own helpful answers to harmless prompts, or, for
``--ssv response-compliant``, its residuals over the target's compliant answers to the same harmful prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from aligner_runtime.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, position_ids
from aligner_runtime.errors import AlignerError, atomic_path

from aligner_export.evaluation.judge import KeywordJudge
from aligner_export.hf.families import family_for
from aligner_export.hf.modeling import chat_texts, fingerprint, tokenize_batch

MIN_ANSWERS = 8  # answers of each kind a response vector's class mean needs (calibrate's MIN_PROMPTS)
# The aligned model answers this many calibration prompts of each class (and, for response-compliant, the target this
# many harmful ones), greedily, with at most RESPONSE_TOKENS new tokens.
RESPONSE_PROMPTS = 128
RESPONSE_TOKENS = 48


def generate_answers(model, tokenizer, prompts, max_new_tokens: int = RESPONSE_TOKENS, batch_size: int = 16,
                     desc: str = "answers") -> list[tuple[str, bool]]:
    """Greedy answers of ``model`` to the chat-templated ``prompts``: ``(text, ended)`` with ``ended`` when the model
    produced an end-of-sequence token within ``max_new_tokens`` (the text then ends before it)."""
    # deferred: torch, the model run's own import (the package imports without it)
    import torch
    # deferred: tqdm (the export extra): aligner-export's parser imports this module in a device install
    from tqdm import tqdm

    texts = chat_texts(tokenizer, prompts)[0]
    eos = tokenizer.eos_token_id
    out: list[tuple[str, bool]] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", file=sys.stderr, leave=False):
            batch = tokenize_batch(tokenizer, texts[start:start + batch_size], padding_side="left")
            sequences = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                       pad_token_id=tokenizer.pad_token_id)
            for row in sequences[:, batch[INPUT_IDS].shape[1]:].tolist():
                ended = eos in row
                row = row[:row.index(eos)] if ended else row
                out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    return out


def answer_residuals(model, tokenizer, prompts, answers, batch_size: int = 16) -> np.ndarray:
    """``[N, L, H]``: each decoder layer's output averaged over the tokens of the answer that follows the
    chat-templated prompt (the prompt's own positions are left out)."""
    # deferred: torch, the model run's own import (the package imports without it)
    import torch

    family = family_for(model.config)
    layers = family.decoder_layers(model)
    decoder = family.language_model(model).model
    texts = chat_texts(tokenizer, prompts)[0]
    captured: dict[int, "torch.Tensor"] = {}
    handles = [layer.register_forward_hook(
        lambda _m, _a, output, i=i: captured.__setitem__(i, output[0] if isinstance(output, tuple) else output))
        for i, layer in enumerate(layers)]
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                heads = texts[start:start + batch_size]
                full = [h + a for h, a in zip(heads, answers[start:start + batch_size])]
                prompt_lengths = [len(tokenizer(h, add_special_tokens=False)[INPUT_IDS]) for h in heads]
                batch = tokenize_batch(tokenizer, full, padding_side="right")
                mask = batch[ATTENTION_MASK]
                decoder(**{INPUT_IDS: batch[INPUT_IDS], ATTENTION_MASK: mask,
                           POSITION_IDS: torch.from_numpy(position_ids(mask.numpy()))}, use_cache=False)
                answer_mask = mask.clone()
                for j, length in enumerate(prompt_lengths):
                    answer_mask[j, :length] = 0
                weights = answer_mask.float()[:, :, None]
                count = weights.sum(1).clamp(min=1)
                out.append(torch.stack([(captured[l].float() * weights).sum(1) / count for l in range(len(layers))],
                                       dim=1).numpy())
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return np.concatenate(out)


def cached_answers(model, tokenizer, sets: dict, cache: Path | None, log=lambda *_: None,
                   who: str = "aligned") -> dict:
    """``{name: [(text, ended), ...]}``: the greedy answers of ``model`` to each named prompt set, generated once and
    kept in ``cache`` (a JSON file; used again only for the same model fingerprint, prompts and token budget)."""
    names, model_print = list(sets), fingerprint(model)
    prompts = [list(sets[n]) for n in names]
    if cache is not None and cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if (saved["prompts"] == prompts and saved["model"] == model_print
                    and saved["max_new_tokens"] == RESPONSE_TOKENS
                    and all(len(saved[n]) == len(p) for n, p in zip(names, prompts))):
                return {n: [(str(text), bool(ended)) for text, ended in saved[n]] for n in names}
        except (ValueError, KeyError, TypeError):
            pass
    log(f"{who}: answering " + " and ".join(f"{len(p)} {n}" for n, p in zip(names, prompts))
        + " calibration prompts (once; cached)")
    answers = {n: generate_answers(model, tokenizer, p, desc=f"{who} answers ({n})") for n, p in zip(names, prompts)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            Path(tmp).write_text(json.dumps({"model": model_print, "max_new_tokens": RESPONSE_TOKENS,
                                             "prompts": prompts, **answers}))
    return answers


def response_srv(model, tokenizer, harmful, harmless, end_text: str, cache: Path | None, log=lambda *_: None,
                 compliant=None):
    """Response-derived steering vectors (issue 17): the unit difference, per layer, of the aligned ``model``'s
    residuals over its own refusals of ``harmful`` prompts and over a negative: its own helpful answers to
    ``harmless`` prompts (``--ssv response``), or, given ``compliant`` (the target's answers ``(text, ended)`` to the
    same ``harmful`` prompts), the target's answers that are not refusals, read by the aligned model
    (``--ssv response-compliant``). A refusal that ended is followed by ``end_text`` (the end-of-sequence token), so
    that the vector carries the end too; the negatives are read as they are. The aligned model's answers are
    generated once and kept in ``cache``. Returns ``(srv [L, H], info)``."""
    answers = cached_answers(model, tokenizer, {"harmful": harmful, "harmless": harmless}, cache, log)
    answers = (answers["harmful"], answers["harmless"])
    judge = KeywordJudge()
    refused = [i for i, (p, (a, _)) in enumerate(zip(harmful, answers[0])) if judge.is_refusal(p, a)]
    helped = [i for i, (p, (a, _)) in enumerate(zip(harmless, answers[1])) if not judge.is_refusal(p, a)]
    if compliant is None and (len(refused) < MIN_ANSWERS or len(helped) < MIN_ANSWERS):
        raise AlignerError(f"the aligned model refused {len(refused)} of {len(harmful)} harmful and answered "
                           f"{len(helped)} of {len(harmless)} harmless calibration prompts; response vectors need "
                           f"at least {MIN_ANSWERS} of each (use --ssv prompt, or a better aligned model)")
    if compliant is not None:
        if len(compliant) != len(harmful):
            raise AlignerError(f"{len(compliant)} target answers for {len(harmful)} harmful prompts")
        # The target's compliant answers: not refusals, and not empty (an answer of no tokens has no residual).
        complied = [i for i, (p, (a, _)) in enumerate(zip(harmful, compliant))
                    if a.strip() and not judge.is_refusal(p, a)]
        if len(refused) < MIN_ANSWERS or len(complied) < MIN_ANSWERS:
            raise AlignerError(f"the aligned model refused {len(refused)} and the target complied with "
                               f"{len(complied)} of {len(harmful)} harmful calibration prompts; response-compliant "
                               f"vectors need at least {MIN_ANSWERS} of each (use --ssv response or --ssv prompt)")
    refusals = [answers[0][i][0] + (end_text if answers[0][i][1] else "") for i in refused]
    on_h = answer_residuals(model, tokenizer, [harmful[i] for i in refused], refusals)
    info = {"ssv": "response", "refused": len(refused), "harmful": len(harmful), "answered": len(helped),
            "harmless": len(harmless), "refusals_ended": sum(answers[0][i][1] for i in refused),
            "max_new_tokens": RESPONSE_TOKENS,
            "mean_refusal_words": float(np.mean([len(r.split()) for r in refusals]))}
    if compliant is None:
        on_b = answer_residuals(model, tokenizer, [harmless[i] for i in helped], [answers[1][i][0] for i in helped])
    else:
        negatives = [compliant[i][0] for i in complied]
        on_b = answer_residuals(model, tokenizer, [harmful[i] for i in complied], negatives)
        info.update({"ssv": "response-compliant", "complied": len(complied),
                     "compliant_ended": sum(compliant[i][1] for i in complied),
                     "paired": len(set(refused) & set(complied)),
                     "mean_compliant_words": float(np.mean([len(a.split()) for a in negatives]))})
    return _unit(on_h.mean(axis=0, dtype=np.float64) - on_b.mean(axis=0, dtype=np.float64)), info


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise AlignerError("a response direction has zero length: the two means coincide")
    return (v / norm).astype(np.float32)
