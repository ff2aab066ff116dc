"""Tiny random LLaVA models built in code: a CLIP-like vision tower, a projector and a tiny llama (issue 6).

``build_tiny_llava`` writes a ``LlavaForConditionalGeneration`` directory with its processor (CLIP image processor,
the byte-level tokenizer of :mod:`tiny_models` plus an ``<image>`` token, and a chat template); ``build_text_sibling``
writes a text-only ``LlamaForCausalLM`` sharing the language model's base, perturbed, as the aligned model. Nothing
is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import build_tokenizer, config_for

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 patches + CLS; the "default" strategy drops CLS: 16 features per image

# ChatML whose user content is a list of parts; an image part renders as the image token on its own line.
TEMPLATE_PARTS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA-1.5 style: the template renders text only; the user writes <image> in the prompt where the image goes.
TEMPLATE_TEXT_ONLY = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_vlm_tokenizer(template: str = TEMPLATE_PARTS):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = template
    return tok


def _init(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)


def _tiny_parts(template: str, num_layers: int, hidden_size: int):
    """The tokenizer (with ``<image>``), the tiny llama's config and the tiny CLIP tower's config."""
    from transformers import CLIPVisionConfig

    tok = build_vlm_tokenizer(template)
    text = config_for("llama", len(tok), num_layers=num_layers, hidden_size=hidden_size)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    return tok, text, vision


def _random_model(model_class, config, tok, seed: int):
    """``model_class(config)`` in float32 with the tokenizer's special ids and the seeded larger-than-default init."""
    import torch

    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, \
        tok.pad_token_id
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    _init(model, seed)
    return model


def build_tiny_llava(path: str | Path, seed: int = 0, num_layers: int = 4, hidden_size: int = 64,
                     template: str = TEMPLATE_PARTS) -> Path:
    """Writes a tiny random LLaVA with its processor to ``path``; returns the path."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    tok, text, vision = _tiny_parts(template, num_layers, hidden_size)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = _random_model(LlavaForConditionalGeneration, config, tok, seed)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    processor.save_pretrained(path)
    return path


def build_text_sibling(vlm_dir: str | Path, path: str | Path, seed: int = 1, noise: float = 0.02) -> Path:
    """A text-only ``LlamaForCausalLM`` with the VLM's language model weights plus seeded noise (the "aligned"
    sibling that shares the base), with the plain ChatML tokenizer."""
    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from tiny_models import CHATML

    path = Path(path)
    vlm = LlavaForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32)
    lm = LlamaForCausalLM(vlm.config.text_config)
    lm.model.load_state_dict(vlm.model.language_model.state_dict())
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.add_(noise * torch.randn(p.shape, generator=generator))
    lm.eval()
    lm.save_pretrained(path, safe_serialization=True)
    tok = build_vlm_tokenizer(CHATML)
    tok.save_pretrained(path)
    lm.generation_config.save_pretrained(path)
    return path


def parts_template(text_template: str) -> str:
    """A ChatML-family template rewritten to take content parts: identical output for string content, an image
    part renders as the image token on its own line. Only for templates that write ``message['content']`` once."""
    needle = "message['content']"
    if text_template.count(needle) != 1:
        raise ValueError("template does not write message['content'] exactly once")
    marker = "'\n' + " + needle + " + '<|im_end|>'"  # ChatML: role line, then the content, then <|im_end|>
    if marker not in text_template:
        raise ValueError("unsupported template layout")
    head, tail = text_template.split(marker, 1)
    loop = ("'\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>'")
    return head + loop + tail


def build_llava_on(lm_dir: str | Path, path: str | Path, seed: int = 0) -> Path:
    """A LLaVA whose language model is the causal LM in ``lm_dir`` (weights copied; ``<image>`` added to the
    vocabulary, its embedding row the mean of the others) with a small random CLIP tower and projector
    (64x64 images, 16x16 patches: 16 features per image). Used with the embedded SmolLM2 for integration tests."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    template = parts_template(tok.chat_template)
    tok.chat_template = template
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[-1] = emb[:-1].mean(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16, projection_dim=64)
    config = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_id=tok.convert_tokens_to_ids(
        IMAGE_TOKEN), vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight if lm.config.tie_word_embeddings \
        else torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    with torch.no_grad():
        for module in (model.model.vision_tower, model.model.multi_modal_projector):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    if (Path(lm_dir) / "generation_config.json").is_file():
        import shutil

        shutil.copy2(Path(lm_dir) / "generation_config.json", path / "generation_config.json")
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template).save_pretrained(path)
    return path


GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]


def build_tiny_llava_next(path: str | Path, seed: int = 0, num_layers: int = 4, hidden_size: int = 64,
                          template: str = TEMPLATE_PARTS) -> Path:
    """A tiny random LLaVA-NeXT: the tiny CLIP tower on 32x32 tiles (16 features per tile), any-resolution grids
    up to 64x96 pixels, a learned image_newline, the tiny llama."""
    import torch
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    path = Path(path)
    tok, text, vision = _tiny_parts(template, num_layers, hidden_size)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=GRID_PINPOINTS,
                             projector_hidden_act="gelu")
    model = _random_model(LlavaNextForConditionalGeneration, config, tok, seed)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    images = LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                     crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                     image_grid_pinpoints=GRID_PINPOINTS)
    LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH_SIZE,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(path)
    return path
