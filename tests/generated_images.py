"""Images generated in the tests (seeded noise over smooth gradients), shared by the preprocessing tests."""

from __future__ import annotations

import numpy as np


def make_pixels(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Seeded noise over smooth gradients: uint8 [H, W, C]."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    phase = np.arange(channels)[None, None, :]
    smooth = 110 + 90 * np.sin(3 * x + 2 * y + phase) * np.cos(2 * x - 4 * y + 0.5 * phase)
    noise = rng.normal(0.0, 25.0, size=(height, width, channels))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def make_image(height: int, width: int, mode: str, seed: int = 0):
    """A PIL image of ``mode`` RGB, RGBA, L or P (a 64-colour palette of the RGB image)."""
    from PIL import Image

    if mode == "L":
        return Image.fromarray(make_pixels(height, width, 1, seed)[:, :, 0])
    if mode == "RGBA":
        return Image.fromarray(make_pixels(height, width, 4, seed))
    rgb = Image.fromarray(make_pixels(height, width, 3, seed))
    if mode == "P":
        return rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    return rgb
