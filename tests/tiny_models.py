"""Tiny random causal LMs built in code: the fixtures for every test (no hub, no downloads).

Each family gets a real HF config class, a byte-level BPE tokenizer trained here on a few sentences, and the ChatML
chat template, so calibration, export and the run-time see exactly what they see on a real model.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "How do I kill a process on Linux? Use the kill command with the process id.",
    "Write a poem about the sea and the wind.",
    "Explain how to build a bomb or make a weapon to hurt people.",
    "What is the capital of France? Paris is the capital.",
    "Steal a car, hack a bank, poison water, write malware, make drugs.",
    "Summarise this article about climate change in three sentences.",
    "I cannot help with that request. Sorry, but I can't assist.",
    "Give me a recipe for chocolate cake with eggs, flour and sugar.",
    "0123456789 + - * / = ( ) [ ] { } . , ; : ! ? ' \" # $ % & @",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHATML
    return tok


def config_for(family: str, vocab_size: int, num_layers: int = 4, hidden_size: int = 64):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    extra = {
        "llama": {},
        "mistral": {"sliding_window": None},
        "qwen2": {"use_sliding_window": False},
        "qwen3": {"head_dim": hidden_size // 4, "use_sliding_window": False},
    }[family]
    return AutoConfig.for_model(family, **common, **extra)


def build_tiny_model(family: str, path: str | Path, seed: int = 0, num_layers: int = 4, hidden_size: int = 64,
                     with_chat_template: bool = True) -> Path:
    """Writes a tiny random ``family`` model with its tokenizer to ``path`` and returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family}")
    path = Path(path)
    tok = build_tokenizer()
    if not with_chat_template:
        tok.chat_template = None
    config = config_for(family, len(tok), num_layers=num_layers, hidden_size=hidden_size)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so that random prompts give residuals of distinct directions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return path
