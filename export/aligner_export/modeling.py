"""Loading HF causal LMs, fingerprints, and chat-templated prompts for calibration."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from aligner_runtime.chat import PLAIN_TEMPLATE, template_sha256
from aligner_runtime.errors import AlignerError

from .families import family_for

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path) -> dict:
    """Validates a model directory without loading weights; returns its config dict."""
    path = Path(path)
    if not path.is_dir():
        raise AlignerError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise AlignerError(f"not a Hugging Face model directory (no config.json): {path}")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignerError(f"cannot read {cfg_file}: {exc}") from None
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise AlignerError(f"{path} is not a causal LM (architectures: {', '.join(archs)})")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise AlignerError(f"model directory has no weights ({' or '.join(WEIGHT_FILES[::2])}): {path}")
    return config


def load_model(path, dtype=None):
    """Loads ``(model, tokenizer)`` in eval mode; user errors become :class:`AlignerError`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AlignerError(f"cannot read the model config in {path}: {str(exc).splitlines()[0]}") from None
    family_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AlignerError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def fingerprint(model) -> str:
    """sha256 over the architecture config and the embedding matrix's shape and bytes (ARCHITECTURE.md §4)."""
    import numpy as np

    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "vocab_size", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings")}
    emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    digest = hashlib.sha256()
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode())
    digest.update(json.dumps(list(emb.shape)).encode())
    digest.update(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    return digest.hexdigest()


def chat_template_of(tokenizer) -> tuple[str, bool]:
    """Returns ``(template, used_fallback)``: the tokenizer's chat template, or the plain one with a warning."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if template:
        return template, False
    warnings.warn("the tokenizer has no chat template; using a plain 'User: ... Assistant:' template", stacklevel=2)
    return PLAIN_TEMPLATE, True


def chat_texts(tokenizer, prompts) -> tuple[list[str], str, bool]:
    """Wraps each prompt as one user turn with the generation prompt appended.

    Returns ``(texts, chat_template_sha256, used_fallback)``.
    """
    template, fallback = chat_template_of(tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=template,
                                           add_generation_prompt=True, tokenize=False) for p in prompts]
    return texts, template_sha256(template), fallback


def tokenize_batch(tokenizer, texts, padding_side: str = "left"):
    """Tokenizes chat-templated texts as one padded batch (no extra special tokens: the template has them)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
