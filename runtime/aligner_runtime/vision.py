"""Image preprocessing for LLaVA-style exports, with numpy and Pillow only (issue 6: no torch on the device).

It reproduces the slow, PIL-based ``transformers.CLIPImageProcessor`` that LLaVA-1.5 uses, step for step and in
the same dtypes, so ``pixel_values`` match HF's to float32 rounding:

1. convert to RGB with ``Image.convert("RGB")`` (alpha is dropped, not composited, as HF does);
2. resize with Pillow: the shortest edge to ``n`` (the long edge ``int(n * long / short)``, torchvision's rule) or to
   an exact (height, width);
3. center crop on the uint8 array, padding with zeros where the crop is larger than the image;
4. rescale in float64 then cast to float32; normalize ``(x - mean) / std`` in float32;
5. channels first: ``[N, 3, H, W]`` float32.

A path is opened the way HF's ``load_image`` opens it (EXIF orientation applied). A float array in [0, 1] is
scaled to uint8 the way HF's ``to_pil_image`` does; the result equals HF's with ``do_rescale=False`` for that array,
which is how HF expects such arrays to be passed.

LLaVA-NeXT ("anyres", :class:`AnyResSpec`, :func:`preprocess_anyres`) reproduces the slow
``LlavaNextImageProcessor``: the image is resized into the best of ``image_grid_pinpoints`` (aspect ratio kept,
zero padding centred), cut into tiles of the crop size, row by row, and a square-resized copy of the whole image
goes first; the base image and every tile then take the CLIP steps 2-5 above.

The specifications these steps follow (what the manifest records) are in :mod:`aligner_runtime.vision_spec`.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from .errors import AlignerError
from .vision_spec import AnyResSpec, ImageSpec

if TYPE_CHECKING:
    from PIL import Image as PILImage


def _pil():
    try:
        # deferred: Pillow, only when a prompt comes with an image
        from PIL import Image, ImageOps
    except ImportError:
        raise AlignerError("image input needs Pillow: pip install pillow") from None
    return Image, ImageOps


def load_image(source) -> PILImage.Image:
    """A fully decoded PIL image from a path, a PIL image or a numpy array (HWC, HW or CHW)."""
    Image, ImageOps = _pil()
    if isinstance(source, Image.Image):
        try:
            source.load()  # an image opened lazily by the caller decodes here, so a truncated one fails here
        except (OSError, ValueError, SyntaxError) as exc:
            raise AlignerError(f"cannot read image: not an image Pillow can decode ({exc})") from None
        return source
    if isinstance(source, np.ndarray):
        return _image_from_array(source, Image)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(os.fspath(source), Image, ImageOps)
    raise AlignerError(f"image must be a path, a PIL image or a numpy array, got {type(source).__name__}")


def preprocess(images, spec: ImageSpec) -> np.ndarray:
    """``pixel_values`` float32 ``[N, 3, H, W]`` for one image source or a list of them."""
    sources = _as_list(images)
    if not sources:
        raise AlignerError("no images to preprocess")
    out = np.empty((len(sources), 3) + tuple(spec.output_size), dtype=np.float32)
    for i, source in enumerate(sources):
        out[i] = _preprocess_one(load_image(source), spec)
    return out


def preprocess_anyres(image, spec: AnyResSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """One image source -> (``pixel_values`` float32 ``[1 + tiles, 3, th, tw]``, base image first, then the tiles
    row by row; the image's original (height, width), HF's ``image_sizes`` entry)."""
    Image, _ = _pil()
    if isinstance(image, (list, tuple)):
        raise AlignerError("preprocess_anyres takes one image; use preprocess_anyres_batch for several")
    rgb = _to_rgb(load_image(image), spec.base)
    height, width = rgb.height, rgb.width
    best_height, best_width = spec.best_resolution(height, width)
    # _resize_for_patching: fit inside the pinpoint, keeping the aspect ratio (get_patch_output_size).
    scale_width, scale_height = best_width / width, best_height / height
    if scale_width < scale_height:
        new_height, new_width = min(math.ceil(height * scale_width), best_height), best_width
    else:
        new_height, new_width = best_height, min(math.ceil(width * scale_height), best_width)
    resized = np.array(rgb.resize((new_width, new_height), resample=spec.base.resample))
    # _pad_for_patching: zeros, the odd pixel going to the bottom / right.
    canvas = np.zeros((best_height, best_width, 3), dtype=np.uint8)
    top, left = (best_height - new_height) // 2, (best_width - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = resized
    side = spec.base_resize
    images = [rgb.resize((side, side), resample=spec.base.resample)]
    tile = spec.tile_size[0]
    for row in range(0, best_height, tile):
        for col in range(0, best_width, tile):
            images.append(Image.fromarray(np.ascontiguousarray(canvas[row:row + tile, col:col + tile])))
    out = np.empty((len(images), 3) + tuple(spec.base.output_size), dtype=np.float32)
    for i, piece in enumerate(images):
        out[i] = _preprocess_one(piece, spec.base)
    return out, (height, width)


def preprocess_anyres_batch(images, spec: AnyResSpec) -> tuple[np.ndarray, np.ndarray]:
    """Several images as HF batches them (``do_pad``): ``pixel_values`` ``[N, P, 3, th, tw]`` with each image's
    tiles zero-padded to the longest ``P``, and ``image_sizes`` int64 ``[N, 2]``. The model reads each image's own
    count back from its size, so the padding is never seen."""
    sources = _as_list(images)
    if not sources:
        raise AlignerError("no images to preprocess")
    results = [preprocess_anyres(source, spec) for source in sources]
    most = max(pixels.shape[0] for pixels, _ in results)
    out = np.zeros((len(results), most, 3) + tuple(spec.base.output_size), dtype=np.float32)
    for i, (pixels, _) in enumerate(results):
        out[i, :pixels.shape[0]] = pixels
    return out, np.array([size for _, size in results], dtype=np.int64)


def _to_rgb(image, spec: ImageSpec):
    if image.mode != "RGB":
        if not spec.do_convert_rgb:
            raise AlignerError(f"image has mode {image.mode} but the export's preprocessing does not convert to RGB")
        image = image.convert("RGB")
    return image


def _preprocess_one(image, spec: ImageSpec) -> np.ndarray:
    image = _to_rgb(image, spec)
    height, width = spec.resized_size(image.height, image.width)
    # reducing_gap=None, as HF's resize passes it.
    pixels = np.array(image.resize((width, height), resample=spec.resample))
    if spec.do_center_crop:
        pixels = _center_crop(pixels, *spec.crop_height_width)
    if spec.do_rescale:
        # HF upcasts to float64 before scaling and downcasts to float32 after (image_transforms.rescale).
        pixels = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        if not np.issubdtype(pixels.dtype, np.floating):
            pixels = pixels.astype(np.float32)
        mean = np.array(spec.image_mean, dtype=pixels.dtype)
        std = np.array(spec.image_std, dtype=pixels.dtype)
        pixels = (pixels - mean) / std
    return pixels.astype(np.float32).transpose(2, 0, 1)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """HF's center_crop on an HWC array: zero padding where the crop is larger than the image."""
    height, width = pixels.shape[:2]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((new_height, new_width) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad = math.ceil((new_height - height) / 2)
    left_pad = math.ceil((new_width - width) / 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top += top_pad
    left += left_pad
    return padded[max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]


def _open_path(path: str, Image, ImageOps):
    if not os.path.exists(path):
        raise AlignerError(f"image not found: {path}")
    if os.path.isdir(path):
        raise AlignerError(f"image path is a directory: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so a truncated file fails here and not mid-run
            # HF's load_image applies the EXIF orientation; exif_transpose returns a copy that outlives the file.
            return ImageOps.exif_transpose(opened)
    except PermissionError:
        raise AlignerError(f"cannot read image {path}: permission denied") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AlignerError(f"cannot read image {path}: not an image file Pillow can read ({reason})") from None


def _image_from_array(array: np.ndarray, Image):
    shape = array.shape
    if array.ndim == 3:
        # HF's infer_channel_dimension_format: channels first when the first axis could be channels.
        if shape[0] in (1, 3):
            array = array.transpose(1, 2, 0)
        elif shape[2] not in (1, 3, 4):
            raise AlignerError(f"image array of shape {shape} is not HxW, HxWxC or CxHxW with C in 1, 3, 4")
        if array.shape[2] == 1:
            array = array[:, :, 0]
    elif array.ndim != 2:
        raise AlignerError(f"image array of shape {shape} is not HxW, HxWxC or CxHxW with C in 1, 3, 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise AlignerError(f"image array of shape {shape} is empty")
    array = _to_uint8(array)
    # For uint8, Pillow picks L, RGB or RGBA from the shape.
    return Image.fromarray(np.ascontiguousarray(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels as HF's to_pil_image makes them (_rescale_for_pil_conversion)."""
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise AlignerError(f"image array has dtype {array.dtype}; expected uint8, an integer type or a float type")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise AlignerError("image array has NaN or infinite values")
    if np.allclose(array, array.astype(int)):
        if array.min() < 0 or array.max() > 255:
            raise AlignerError(f"image array values span [{array.min()}, {array.max()}]; expected [0, 255]")
        return array.astype(np.uint8)
    if array.min() < 0 or array.max() > 1:
        raise AlignerError(
            f"image array of floats spans [{array.min()}, {array.max()}]; expected [0, 1] or integers in [0, 255]"
        )
    return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]
