"""Image input for vision-language exports (issue 6), without torch.

A LLaVA export holds three graphs (``aligner_export.multimodal``): ``vision.onnx`` (pixel_values -> image features),
``embed.onnx`` (input_ids -> inputs_embeds) and ``model.onnx`` (the steered language model, fed ``inputs_embeds``).
This module reads the manifest's ``multimodal`` object, turns a prompt with images into token ids (each image token
expanded to ``image_seq_length`` copies, as the HF processor does), and builds the prompt's embeddings: the token
embeddings with the image features written at the image-token positions, in order (``masked_scatter`` in
``LlavaModel.forward``). The gate then reads the last prompt token as for text (ARCHITECTURE.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import AlignerError

VISION_FILE = "vision.onnx"
EMBED_FILE = "embed.onnx"
PLACEMENTS = ("template", "prompt")
_REQUIRED = ("vision_model", "embed_model", "image_token", "image_token_id", "image_seq_length", "placement",
             "preprocessing")


def merge_image_features(input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray,
                         image_token_id: int) -> np.ndarray:
    """``embeds`` with the rows at the image-token positions replaced by ``features`` ([N, F, H]), in row-major
    order: image ``i`` of the batch fills the ``i``-th run of ``F`` image tokens."""
    input_ids = np.asarray(input_ids)
    mask = input_ids == image_token_id
    features = np.asarray(features)
    wanted = int(mask.sum())
    if features.size == 0 and wanted == 0:
        return embeds
    if wanted != features.shape[0] * features.shape[1]:
        raise AlignerError(f"the prompt holds {wanted} image tokens but the images give "
                           f"{features.shape[0] * features.shape[1]} features ({features.shape[0]} x "
                           f"{features.shape[1]})")
    out = np.array(embeds, copy=True)
    out[mask] = features.reshape(-1, features.shape[-1]).astype(out.dtype)
    return out


@dataclass(frozen=True)
class MultimodalSpec:
    """The manifest's ``multimodal`` object, checked."""

    architecture: str
    vision_model: str
    embed_model: str
    image_token: str
    image_token_id: int
    image_seq_length: int
    placement: str
    preprocessing: dict

    @classmethod
    def from_manifest(cls, manifest: dict) -> "MultimodalSpec | None":
        data = manifest.get("multimodal")
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
        if not isinstance(data["image_seq_length"], int) or data["image_seq_length"] < 1:
            raise AlignerError(f"the manifest's image_seq_length {data['image_seq_length']!r} is not a positive int")
        return cls(architecture=str(data.get("architecture", "llava")), vision_model=str(data["vision_model"]),
                   embed_model=str(data["embed_model"]), image_token=str(data["image_token"]),
                   image_token_id=int(data["image_token_id"]), image_seq_length=int(data["image_seq_length"]),
                   placement=data["placement"], preprocessing=dict(data["preprocessing"]))

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


def expand_image_tokens(text: str, spec: MultimodalSpec, num_images: int) -> str:
    """Checks the rendered prompt holds one image token per image and expands each to ``image_seq_length`` copies
    (LlavaProcessor's rule)."""
    token = spec.image_token
    found = text.count(token)
    if found != num_images:
        if num_images and not found:
            where = ("write it in the prompt where the image goes" if spec.placement == "prompt"
                     else "the chat template did not place it")
            raise AlignerError(f"the prompt has no image token {token} where the chat template needs one ({where})")
        if found and not num_images:
            raise AlignerError(f"the prompt contains the image token {token} but no image was given")
        raise AlignerError(f"the prompt has {found} image tokens {token} for {num_images} images")
    return text.replace(token, token * spec.image_seq_length) if num_images else text


class ImageEncoder:
    """The vision and embedding graphs of a multimodal export on ONNX Runtime. Thread-safe (ORT sessions are)."""

    def __init__(self, directory: str | Path, spec: MultimodalSpec, providers=None, threads: int | None = None):
        from .backends.onnxruntime import session_for
        from .vision import ImageSpec

        directory = Path(directory)
        spec.check_files(directory)
        self.spec = spec
        self.image_spec = ImageSpec.from_manifest(spec.preprocessing)
        self.vision = session_for(directory / spec.vision_model, providers, threads)
        self.embedder = session_for(directory / spec.embed_model, providers, threads)
        self._vision_out = self.vision.get_outputs()[0].name
        self._embed_out = self.embedder.get_outputs()[0].name

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embedder.run([self._embed_out], {"input_ids": np.asarray(input_ids, np.int64)})[0]

    def pixel_values(self, images: Sequence) -> np.ndarray:
        from .vision import preprocess

        return preprocess(list(images), self.image_spec)

    def features(self, images: Sequence) -> np.ndarray:
        """[N, F, H] image features of ``images`` (paths, PIL images or arrays)."""
        pixels = self.pixel_values(images)
        features = self.vision.run([self._vision_out], {"pixel_values": pixels})[0]
        if features.shape[1] != self.spec.image_seq_length:
            raise AlignerError(f"the vision graph gives {features.shape[1]} features per image; the manifest says "
                               f"{self.spec.image_seq_length}")
        return features

    def prompt_embeds(self, ids: Sequence[int], images: Sequence) -> np.ndarray:
        """[len(ids), H] embeddings of one prompt with its images merged."""
        ids_array = np.asarray([list(ids)], np.int64)
        embeds = self.embed(ids_array)
        if not images:
            return embeds[0]
        return merge_image_features(ids_array, embeds, self.features(images), self.spec.image_token_id)[0]
