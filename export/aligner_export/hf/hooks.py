"""What the export pipeline does differently for each kind of family, one entry per kind.

:mod:`aligner_export.hf.families` is the bottom table (what a family is: its layers, its language model); the hooks
here sit above it, beside the modules they call, so that the pipeline (:mod:`aligner_export.hf.export`) asks
``hooks_for(family)`` and never ``if multimodal``. A new kind of family is a ``Family`` subclass there and its
entry in :data:`HOOKS` here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from aligner_runtime.contract import Key
from aligner_runtime.errors import AlignerError

from aligner_export.hf import multimodal
from aligner_export.hf.families import Family, VisionLanguageFamily
from aligner_export.hf.modeling import chat_template_of
from aligner_export.hf.validate import Validation, validate


class TextHooks:
    """A text decoder: one graph, validated against the PyTorch reference as exported."""

    extra_stage: str | None = None  # the progress stage of write_extra_graphs, when it writes any

    def prepare_graph(self, ir_model, hidden_size: int) -> None:
        """Adapts the base export before the residual stream is located (nothing for a text model)."""

    def write_extra_graphs(self, model, tokenizer, out_dir: Path, opset: int, log) -> dict:
        """Writes the graphs beside ``model.onnx`` and returns the manifest entries describing them."""
        return {}

    def validate(self, out_dir: Path, model_path: Path, model, tokenizer, config, dtype: str, manifest: dict,
                 padding_side: str) -> Validation:
        """ONNX Runtime against the PyTorch reference (:func:`aligner_export.hf.validate.validate`), in the padding
        the graph takes (right for a GroupQueryAttention graph, :mod:`aligner_export.graph.fused`)."""
        return validate(model_path, model, tokenizer, config, dtype=dtype, padding_side=padding_side)


class VisionLanguageHooks(TextHooks):
    """A LLaVA-style model: its language model graph takes ``inputs_embeds``; the vision and embedding graphs are
    written beside it and all three are validated together (:mod:`aligner_export.hf.multimodal`)."""

    extra_stage = "vision and embedding graphs"

    def prepare_graph(self, ir_model, hidden_size: int) -> None:
        multimodal.to_inputs_embeds(ir_model, hidden_size)

    def write_extra_graphs(self, model, tokenizer, out_dir: Path, opset: int, log) -> dict:
        image_spec = multimodal.image_spec_of(tokenizer)
        features = multimodal.write_graphs(model, out_dir, image_spec, opset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template = chat_template_of(tokenizer)[0]
        facts = multimodal.multimodal_manifest(model, tokenizer, template, features, image_spec)
        tile_h, tile_w = multimodal.vision_input_size(image_spec)
        unit = "tile (any-resolution grid)" if facts.get("anyres") else "image"
        log(f"vision graph: {features} features per {tile_w}x{tile_h} {unit}; embedding graph; image token "
            f"{facts['image_token']} ({facts['placement']} placement)")
        return {Key.MULTIMODAL: facts}

    def validate(self, out_dir: Path, model_path: Path, model, tokenizer, config, dtype: str, manifest: dict,
                 padding_side: str) -> Validation:
        """The three graphs on a left-padded batch from the model's processor."""
        if padding_side != "left":
            raise AlignerError("the language model graph takes right-padded batches (GroupQueryAttention); "
                               "vision-language exports are validated left-padded only")
        return multimodal.validate_vlm(out_dir, model, tokenizer, config, multimodal.image_spec_of(tokenizer),
                                       manifest[Key.MULTIMODAL], dtype=dtype)


HOOKS: dict[type, TextHooks] = {Family: TextHooks(), VisionLanguageFamily: VisionLanguageHooks()}


def hooks_for(family: Family) -> TextHooks:
    return HOOKS[type(family)]
