"""The prompt-token features of the pooled gate (SteerGate version 3, issue 18; ``aligner_export.gate``): every prompt
token's normalised residual at the candidate gate layers as whitened principal coordinates, collected during the
calibration forward pass with its memory counted first.

Torch-free: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aligner_runtime.errors import AlignerError

POOLED_DIM = 128  # principal coordinates kept per token and layer (the frontier study's)
POOLED_SAMPLE_TOKENS = 8192  # normalised tokens per layer the basis is fitted from (the first batches, shuffled)
MAX_TOKEN_BYTES = 2 << 30  # the most memory the token coordinates (and the basis sample) may take


def token_feature_bytes(total_tokens: int, num_layers: int, dim: int, hidden: int,
                        sample_tokens: int = POOLED_SAMPLE_TOKENS, batch_tokens: int = 4096) -> int:
    """What :class:`TokenCollector` holds at most: the float16 coordinates of every token at every layer, and the
    float16 normalised residuals of the basis sample (one batch beyond it)."""
    return 2 * num_layers * (total_tokens * dim + min(total_tokens, sample_tokens + batch_tokens) * hidden)


@dataclass
class TokenBasis:
    """A layer's principal basis of normalised residuals: ``x = basis·(n(h) − mean) / scale``."""

    mean: np.ndarray  # [H]
    basis: np.ndarray  # [D, H], orthonormal rows (zero rows where the sample had fewer dimensions)
    scale: np.ndarray  # [D], the coordinates' standard deviation on the sample

    def project(self, unit: np.ndarray) -> np.ndarray:
        return ((np.asarray(unit, np.float32) - self.mean) @ self.basis.T) / self.scale

    def to_residual(self, u: np.ndarray) -> tuple[np.ndarray, float]:
        """``(u_h, c)`` with ``u·x = u_h·n(h) + c`` for every ``n(h)``: the coordinates' weight in residual space."""
        u_h = (np.asarray(u, np.float64) / self.scale) @ self.basis.astype(np.float64)
        return u_h, float(-u_h @ self.mean)


def fit_basis(sample: np.ndarray, dim: int) -> TokenBasis:
    sample = np.asarray(sample, np.float32)
    mean = sample.mean(axis=0)
    _, sv, vt = np.linalg.svd(sample - mean, full_matrices=False)
    basis = np.zeros((dim, sample.shape[1]), np.float32)
    scale = np.ones(dim, np.float32)
    k = min(dim, vt.shape[0])
    basis[:k] = vt[:k]
    scale[:k] = np.maximum(sv[:k] / np.sqrt(len(sample)), 1e-6)
    return TokenBasis(mean.astype(np.float32), basis, scale)


@dataclass
class TokenFeatures:
    """Every prompt token's whitened coordinates at ``layers``: ``coords[l]`` ``[T, D]`` float16, prompt ``i``'s
    tokens at ``offsets[i]:offsets[i+1]`` (every valid position, template tokens included)."""

    layers: tuple[int, ...]
    coords: dict
    offsets: np.ndarray
    bases: dict

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def token_scores(self, layer: int, u: np.ndarray) -> np.ndarray:
        """``[T]`` float32: ``u·x`` at every token (one layer's store converted to float32 at a time: numpy converts
        whole arrays faster than slices)."""
        return self.coords[layer].astype(np.float32) @ np.asarray(u, np.float32)

    def segment_max(self, layer: int, u: np.ndarray) -> np.ndarray:
        """``[N]``: each prompt's ``max_s u·x_s``."""
        return np.maximum.reduceat(self.token_scores(layer, u), self.offsets[:-1])

    def top_tokens(self, layer: int, u: np.ndarray, k: int) -> np.ndarray:
        """``[N, k]`` global token indices: each prompt's ``k`` highest-scoring tokens under ``u`` (its last token
        repeated where the prompt is shorter)."""
        scores = self.token_scores(layer, u).astype(np.float64)
        segment = np.repeat(np.arange(self.count), np.diff(self.offsets))
        span = 2.0 * float(np.abs(scores).max()) + 1.0
        order = np.argsort(segment * span - scores)  # by prompt, then by score, highest first (one sort)
        lengths = np.diff(self.offsets)
        rank = np.minimum(np.arange(k)[None, :], lengths[:, None] - 1)
        return order[self.offsets[:-1, None] + rank]


class TokenCollector:
    """Builds :class:`TokenFeatures` prompt by prompt during the calibration forward pass.

    The memory is counted before anything is allocated (:func:`token_feature_bytes` against ``limit``). The first
    prompts' normalised residuals are held until ``sample_tokens`` tokens have been seen, the basis of each layer is
    fitted from them, and from then on every prompt is projected as it arrives. The caller feeds the prompts in an
    order that does not follow their length (calibration shuffles its batches), so that the sample is not the
    shortest prompts alone."""

    def __init__(self, layers, lengths, hidden: int, dim: int = POOLED_DIM,
                 sample_tokens: int = POOLED_SAMPLE_TOKENS, limit: int = MAX_TOKEN_BYTES, seed: int = 0,
                 dtype=np.float16):
        self.layers = tuple(int(l) for l in layers)
        lengths = np.asarray(lengths, np.int64)
        total = int(lengths.sum())
        self.dim = int(min(dim, hidden))
        need = token_feature_bytes(total, len(self.layers), self.dim, hidden, sample_tokens)
        need = need * np.dtype(dtype).itemsize // 2  # the bytes of float16 unless a test asks for float32
        if need > limit:
            raise AlignerError(f"the pooled gate would keep {need / 2 ** 20:.0f} MiB of prompt-token features "
                               f"({total} prompt tokens x {len(self.layers)} layers x {self.dim} dims, "
                               f"{np.dtype(dtype).name}), over "
                               f"the limit of {limit / 2 ** 20:.0f} MiB: calibrate on fewer or shorter prompts, or "
                               f"with --gate linear")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.lengths = lengths
        self.dtype = np.dtype(dtype)  # float16 (calibration); float32 where a test checks the folding exactly
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"token features are float16 or float32, not {self.dtype}")
        self.coords = {l: np.zeros((total, self.dim), self.dtype) for l in self.layers}
        self.sample_tokens = sample_tokens
        self.rng = np.random.default_rng(seed)
        self.pending: list[tuple[int, list[np.ndarray]]] = []
        self.pending_tokens = 0
        self.bases: dict | None = None
        self.filled = np.zeros(len(lengths), bool)

    def add(self, prompt: int, units) -> None:
        """``units``: per layer (in ``layers`` order) the prompt's normalised residuals ``[length, H]``."""
        if any(u.shape[0] != self.lengths[prompt] for u in units):
            raise AlignerError(f"prompt {prompt}: {units[0].shape[0]} residual positions for "
                               f"{self.lengths[prompt]} tokens")
        if self.bases is None:
            self.pending.append((prompt, [np.asarray(u, self.dtype) for u in units]))
            self.pending_tokens += int(self.lengths[prompt])
            if self.pending_tokens >= self.sample_tokens:
                self._fit_bases()
            return
        self._store(prompt, units)

    def _store(self, prompt: int, units) -> None:
        rows = slice(self.offsets[prompt], self.offsets[prompt + 1])
        for layer, u in zip(self.layers, units):
            self.coords[layer][rows] = self.bases[layer].project(u).astype(self.dtype)
        self.filled[prompt] = True

    def _fit_bases(self) -> None:
        self.bases = {}
        for j, layer in enumerate(self.layers):
            sample = np.concatenate([units[j] for _, units in self.pending])
            if len(sample) > self.sample_tokens:
                sample = sample[self.rng.choice(len(sample), self.sample_tokens, replace=False)]
            self.bases[layer] = fit_basis(sample, self.dim)
        pending, self.pending = self.pending, []
        for prompt, units in pending:
            self._store(prompt, units)

    def finish(self) -> TokenFeatures:
        if self.bases is None:
            self._fit_bases()
        if not self.filled.all():
            raise AlignerError(f"the pooled gate's token features miss prompt {int(np.argmin(self.filled))}")
        return TokenFeatures(self.layers, self.coords, self.offsets, self.bases)
