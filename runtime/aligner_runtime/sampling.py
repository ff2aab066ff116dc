"""How each new token is picked: the sampling parameters of a call (checked before anything runs), and greedy or
seeded sampling over one row of logits. Shared by the generation loop (:mod:`.generate`), the serving scheduler and
the request parsers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import AlignerError

# The most new tokens one call may ask for (docs/contract.md "Limits"); the context bounds it further
# (``Aligner.sampling_config``: a prompt's answer never runs past the export's context length).
MAX_NEW_TOKENS = 32768


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. ``temperature == 0`` or ``do_sample=False`` means greedy."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, vocab_size: int | None) -> "SamplingConfig":
        def bad(what: str):
            raise AlignerError(f"invalid sampling parameter: {what}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r:.40}")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            bad(f"max_new_tokens must be at most {MAX_NEW_TOKENS}, got {self.max_new_tokens!r:.40}")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            bad(f"seed must be an integer >= 0, got {self.seed!r}")
        check_token_ids(self.stop_token_ids, vocab_size, "stop token")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def check_token_ids(ids: Sequence[int], vocab_size: int | None, what: str = "token") -> None:
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise AlignerError(f"{what} id {token!r} is not an integer")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise AlignerError(f"{what} id {token} is out of range (vocabulary size {vocab_size})")


def filter_logits(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Temperature, top-k and top-p (nucleus) on one row of float logits; removed tokens become -inf."""
    logits = logits.astype(np.float64) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if config.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        sorted_logits = logits[order]
        probs = np.exp(sorted_logits - sorted_logits[0])
        probs /= probs.sum()
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = np.cumsum(probs) - probs < config.top_p
        removed = order[~keep]
        logits[removed] = -np.inf
    return logits


def pick_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator | None) -> int:
    if config.greedy:
        return int(np.argmax(logits))
    filtered = filter_logits(logits, config)
    probs = np.exp(filtered - filtered.max())
    probs /= probs.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
