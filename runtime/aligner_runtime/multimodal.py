"""Image input for vision-language exports (issue 6), without torch.

A LLaVA export holds three graphs (``aligner_export.multimodal``): ``vision.onnx`` (pixel_values -> image features),
``embed.onnx`` (input_ids -> inputs_embeds) and ``model.onnx`` (the steered language model, fed ``inputs_embeds``).
This module reads the manifest's ``multimodal`` object, turns a prompt with images into token ids (each image token
expanded to ``image_seq_length`` copies, as the HF processor does), and builds the prompt's embeddings: the token
embeddings with the image features written at the image-token positions, in order (``masked_scatter`` in
``LlavaModel.forward``). The gate then reads the last prompt token as for text (docs/architecture.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends.onnxruntime import session_for
from .contract import INPUT_IDS, Key
from .errors import AlignerError
from .vision import load_image, preprocess, preprocess_anyres
from .vision_spec import AnyResSpec, ImageSpec

PLACEMENTS = ("template", "prompt")
_REQUIRED = ("vision_model", "embed_model", "image_token", "image_token_id", "placement", "preprocessing")
ARCHITECTURES = ("llava", "llava_next")


def merge_image_features(input_ids: np.ndarray, embeds: np.ndarray, features, image_token_id: int) -> np.ndarray:
    """``embeds`` with the rows at the image-token positions replaced by the image features, in row-major order:
    image ``i`` of the batch fills the ``i``-th run of image tokens (``masked_scatter`` in ``LlavaModel.forward``).
    ``features``: an array ``[N, F, H]`` (LLaVA, F per image) or a list of ``[n_i, H]`` arrays (LLaVA-NeXT)."""
    input_ids = np.asarray(input_ids)
    mask = input_ids == image_token_id
    if isinstance(features, np.ndarray):
        rows = features.reshape(-1, features.shape[-1]) if features.size else features.reshape(0, 0)
    else:
        rows = np.concatenate([np.asarray(f) for f in features], axis=0) if len(features) else np.zeros((0, 0))
    wanted = int(mask.sum())
    if rows.shape[0] == 0 and wanted == 0:
        return embeds
    if wanted != rows.shape[0]:
        raise AlignerError(f"the prompt holds {wanted} image tokens but the images give {rows.shape[0]} features")
    out = np.array(embeds, copy=True)
    out[mask] = rows.astype(out.dtype)
    return out


def unpad_features(features: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """``unpad_image`` of ``modeling_llava_next``: drops the rows (or columns) of a ``[H, rows, cols]`` feature map
    that cover the padding added when the image was fitted into its grid resolution."""
    original_height, original_width = original_size
    current_height, current_width = features.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return features[:, padding:current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return features[:, :, padding:current_width - padding]


def pack_anyres_features(features: np.ndarray, original_size: tuple[int, int], grid: tuple[int, int],
                         newline: np.ndarray) -> np.ndarray:
    """``pack_image_features`` of ``modeling_llava_next`` (``spatial_unpad``) for one image: ``features`` [P, F, H]
    are the base image's then the ``grid`` tiles' (row-major); returns ``[n, H]``: the base features, then the
    unpadded tile map row by row, each row ended by the ``image_newline`` vector."""
    base, tiles = features[0], features[1:]
    if tiles.shape[0] == 0:
        return np.concatenate([base, newline[None].astype(base.dtype)], axis=0)
    side = math.isqrt(tiles.shape[1])
    if side * side != tiles.shape[1] or tiles.shape[0] != grid[0] * grid[1]:
        raise AlignerError(f"the vision graph gave {tiles.shape[0]} tiles of {tiles.shape[1]} features; the image's "
                           f"grid is {grid[0]}x{grid[1]} tiles of a square patch map")
    hidden = tiles.shape[-1]
    fmap = tiles.reshape(grid[0], grid[1], side, side, hidden).transpose(4, 0, 2, 1, 3)
    fmap = fmap.reshape(hidden, grid[0] * side, grid[1] * side)
    fmap = unpad_features(fmap, original_size)
    column = np.broadcast_to(newline.astype(fmap.dtype)[:, None, None], (hidden, fmap.shape[1], 1))
    fmap = np.concatenate([fmap, column], axis=-1)
    return np.concatenate([base, fmap.reshape(hidden, -1).T], axis=0)


@dataclass(frozen=True)
class MultimodalSpec:
    """The manifest's ``multimodal`` object, checked."""

    architecture: str
    vision_model: str
    embed_model: str
    image_token: str
    image_token_id: int
    image_seq_length: int | None  # features (= image tokens) per image; None for LLaVA-NeXT, where it varies
    placement: str
    preprocessing: dict
    anyres: dict | None = None  # LLaVA-NeXT: {vision_image_size, patch_size, strategy, features_per_tile}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "MultimodalSpec | None":
        data = manifest.get(Key.MULTIMODAL)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise AlignerError("the manifest's multimodal entry is not an object")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise AlignerError(f"the manifest's multimodal entry lacks {', '.join(missing)}")
        if data["placement"] not in PLACEMENTS:
            raise AlignerError(f"the manifest's multimodal placement {data['placement']!r} is not one of "
                               f"{', '.join(PLACEMENTS)}")
        architecture = str(data.get("architecture", "llava"))
        if architecture not in ARCHITECTURES:
            raise AlignerError(f"the manifest's multimodal architecture {architecture!r} is not one of "
                               f"{', '.join(ARCHITECTURES)}")
        anyres = data.get("anyres")
        length = data.get("image_seq_length")
        if architecture == "llava_next":
            keys = ("vision_image_size", "patch_size", "strategy", "features_per_tile")
            if not isinstance(anyres, dict) or any(k not in anyres for k in keys):
                raise AlignerError(f"the manifest's multimodal entry needs anyres with {', '.join(keys)}")
        elif not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise AlignerError(f"the manifest's image_seq_length {length!r} is not a positive int")
        return cls(architecture=architecture, vision_model=str(data["vision_model"]),
                   embed_model=str(data["embed_model"]), image_token=str(data["image_token"]),
                   image_token_id=int(data["image_token_id"]), image_seq_length=length,
                   placement=data["placement"], preprocessing=dict(data["preprocessing"]),
                   anyres=dict(anyres) if anyres else None)

    def check_files(self, directory: Path) -> None:
        for name in (self.vision_model, self.embed_model):
            if not (directory / name).is_file():
                raise AlignerError(f"multimodal export directory has no {name}: {directory}")


def image_sources(images) -> list:
    """One prompt's images as a list: None -> [], a single source -> [source]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def expand_image_tokens(text: str, spec: MultimodalSpec, counts: Sequence[int]) -> str:
    """Checks the rendered prompt holds one image token per image and expands the ``i``-th one to ``counts[i]``
    copies (LlavaProcessor's and LlavaNextProcessor's rule)."""
    token = spec.image_token
    num_images = len(counts)
    found = text.count(token)
    if found != num_images:
        if num_images and not found:
            where = ("write it in the prompt where the image goes" if spec.placement == "prompt"
                     else "the chat template did not place it")
            raise AlignerError(f"the prompt has no image token {token} where the chat template needs one ({where})")
        if found and not num_images:
            raise AlignerError(f"the prompt contains the image token {token} but no image was given")
        raise AlignerError(f"the prompt has {found} image tokens {token} for {num_images} images")
    pieces = text.split(token)
    return pieces[0] + "".join(token * count + piece for count, piece in zip(counts, pieces[1:]))


class ImageEncoder:
    """The vision and embedding graphs of a multimodal export on ONNX Runtime. Thread-safe (ORT sessions are)."""

    def __init__(self, directory: str | Path, spec: MultimodalSpec, providers=None, threads: int | None = None):
        directory = Path(directory)
        spec.check_files(directory)
        self.spec = spec
        self.anyres = spec.anyres is not None
        self.image_spec = (AnyResSpec if self.anyres else ImageSpec).from_manifest(spec.preprocessing)
        self.vision = session_for(directory / spec.vision_model, providers, threads)
        self.embedder = session_for(directory / spec.embed_model, providers, threads)
        outputs = [o.name for o in self.vision.get_outputs()]
        self._vision_out = outputs[0]
        self.newline = None
        if self.anyres:  # LLaVA-NeXT's vision graph also returns the learned image_newline vector
            if "image_newline" not in outputs:
                raise AlignerError(f"{spec.vision_model} has no image_newline output, which LLaVA-NeXT needs")
            probe = np.zeros((1, 3, *self.image_spec.tile_size), np.float32)
            self.newline = self.vision.run(["image_newline"], {"pixel_values": probe})[0]
        self._embed_out = self.embedder.get_outputs()[0].name

    def load(self, images: Sequence) -> list:
        """The images as decoded PIL images (each source read once; a bad one is a one-line error)."""
        return [load_image(image) for image in images]

    def tokens_per_image(self, images: Sequence) -> list[int]:
        """How many image tokens each (loaded) image takes in the prompt."""
        if not self.anyres:
            return [self.spec.image_seq_length] * len(images)
        a = self.spec.anyres
        return [self.image_spec.num_image_tokens(image.height, image.width, a["patch_size"], a["strategy"],
                                                 a.get("num_additional_image_tokens", 1)) for image in images]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embedder.run([self._embed_out], {INPUT_IDS: np.asarray(input_ids, np.int64)})[0]

    def pixel_values(self, images: Sequence) -> np.ndarray:
        return preprocess(list(images), self.image_spec)

    def features(self, images: Sequence):
        """Image features of ``images`` (paths, PIL images or arrays): ``[N, F, H]`` for LLaVA, a list of
        ``[n_i, H]`` (base image, unpadded tiles and newlines packed) for LLaVA-NeXT."""
        if self.anyres:
            return [self._anyres_features(image) for image in images]
        pixels = self.pixel_values(images)
        features = self.vision.run([self._vision_out], {"pixel_values": pixels})[0]
        if features.shape[1] != self.spec.image_seq_length:
            raise AlignerError(f"the vision graph gives {features.shape[1]} features per image; the manifest says "
                               f"{self.spec.image_seq_length}")
        return features

    def _anyres_features(self, image) -> np.ndarray:
        image = load_image(image)
        pixels, (height, width) = preprocess_anyres(image, self.image_spec)
        tiles = self.vision.run([self._vision_out], {"pixel_values": pixels})[0]
        packed = pack_anyres_features(tiles, (height, width), self.image_spec.grid_shape(height, width),
                                      self.newline)
        expected = self.tokens_per_image([image])[0]
        if packed.shape[0] != expected:
            raise AlignerError(f"the image's packed features ({packed.shape[0]}) do not match its token count "
                               f"({expected})")
        return packed

    def prompt_embeds(self, ids: Sequence[int], images: Sequence) -> np.ndarray:
        """[len(ids), H] embeddings of one prompt with its images merged."""
        ids_array = np.asarray([list(ids)], np.int64)
        embeds = self.embed(ids_array)
        if not images:
            return embeds[0]
        return merge_image_features(ids_array, embeds, self.features(images), self.spec.image_token_id)[0]
