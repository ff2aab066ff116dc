"""Loading HF causal LMs (and LLaVA-style vision-language models), fingerprints, and chat-templated prompts.

A vision-language model is loaded whole (``LlavaForConditionalGeneration``); everything that concerns steering looks
at its language model: the decoder layers (``families``), the fingerprint (the language model's config and embedding
matrix, issue 6) and the chat template (the processor's, with the user turn given as a list of content parts).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from aligner_runtime.chat import PLAIN_TEMPLATE, template_sha256
from aligner_runtime.errors import AlignerError

from aligner_export.hf.families import family_for, text_config

# Vision-language architectures this package exports, by the ``architectures`` entry of config.json.
VLM_ARCHITECTURES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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
    if archs and not any(a.endswith("ForCausalLM") or a in VLM_ARCHITECTURES for a in archs):
        if any(a.endswith("ForConditionalGeneration") for a in archs):
            raise AlignerError(f"{path}: vision-language architecture {', '.join(archs)} is not supported "
                               f"(supported: {', '.join(VLM_ARCHITECTURES)})")
        raise AlignerError(f"{path} is not a causal LM (architectures: {', '.join(archs)})")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise AlignerError(f"model directory has no weights ({' or '.join(WEIGHT_FILES[::2])}): {path}")
    return config


def is_vlm_dir(config: dict) -> bool:
    return any(a in VLM_ARCHITECTURES for a in config.get("architectures") or [])


def load_config(path):
    # deferred: transformers, only once a model directory is read
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AlignerError(f"cannot read the model config in {path}: {str(exc).splitlines()[0]}") from None


def model_dims(path) -> tuple[int, int]:
    """``(num_layers, hidden_size)`` of the (language) model in ``path``, without loading weights."""
    check_model_dir(path)
    config = text_config(load_config(path))
    return int(config.num_hidden_layers), int(config.hidden_size)


def load_model(path, dtype=None):
    """Loads ``(model, tokenizer)`` in eval mode; user errors become :class:`AlignerError`.

    A vision-language model comes back whole; its tokenizer carries the processor's chat template and is marked
    (``is_multimodal_tokenizer``) so that prompts are given to the template as content parts.
    """
    # deferred: torch and transformers, only once a model is loaded
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vlm = is_vlm_dir(check_model_dir(path))
    config = load_config(path)
    family_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if vlm:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            if getattr(processor, "chat_template", None):
                tokenizer.chat_template = processor.chat_template
            tokenizer.inferaligner_processor = processor
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32,
                                                                local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AlignerError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def is_multimodal_tokenizer(tokenizer) -> bool:
    return getattr(tokenizer, "inferaligner_processor", None) is not None


def fingerprint(model) -> str:
    """sha256 over the architecture config and the embedding matrix's shape and bytes (docs/architecture.md §4)."""
    cfg = text_config(model.config)  # a vision-language model: its language model part (issue 6)
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


def chat_texts(tokenizer, prompts, systems=None) -> tuple[list[str], str, bool]:
    """Wraps each prompt as one user turn (after its system prompt, where ``systems`` gives one) with the generation
    prompt appended, as ``aligner_runtime.chat.render_chat`` does at run time.

    Returns ``(texts, chat_template_sha256, used_fallback)``.
    """
    template, fallback = chat_template_of(tokenizer)
    parts = is_multimodal_tokenizer(tokenizer)  # a VLM's template takes the user turn as content parts
    systems = list(systems) if systems is not None else [None] * len(prompts)

    def content(text):
        return [{"type": "text", "text": text}] if parts else text

    texts = [tokenizer.apply_chat_template(([{"role": "system", "content": content(system)}] if system else [])
                                           + [{"role": "user", "content": content(p)}], chat_template=template,
                                           add_generation_prompt=True, tokenize=False)
             for p, system in zip(prompts, systems)]
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
