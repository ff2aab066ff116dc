"""What differs between model families, in one place (as onnxruntime-genai's builders do).

The pipeline asks the family object, never ``if family == ...`` or ``if multimodal``. Every supported text family
keeps its decoder layers in ``model.model.layers`` and its residual stream at each decoder layer's output
(docs/architecture.md §3). A vision-language family (LLaVA, LLaVA-NeXT) wraps one of them: its language model's
layers sit at ``model.language_model.layers``, steering works on that residual stream, and its hooks add the vision
and embedding graphs to the export and validate all three graphs (issue 6, docs/multimodal.md).

The hooks import torch, onnx and the multimodal module inside their bodies, so this module stays import-light.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from aligner_runtime.errors import AlignerError
from aligner_runtime.contract import Key


@dataclass(frozen=True)
class Family:
    """A text decoder family: the model is its own language model."""

    model_type: str
    layers_path: str = "model.layers"  # attribute path from the CausalLM to the decoder layer ModuleList
    optimum_task: str = "text-generation-with-past"

    is_multimodal = False

    def decoder_layers(self, model):
        module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module

    # --- export hooks ----------------------------------------------------------------------------------------------
    def language_model(self, model):
        """The causal LM whose graph is exported and steered."""
        return model

    @property
    def text_family(self) -> "Family":
        """The family of :meth:`language_model`."""
        return self

    def prepare_graph(self, ir_model, hidden_size: int) -> None:
        """Adapts the base export before the residual stream is located (nothing for a text model)."""

    def write_extra_graphs(self, model, tokenizer, out_dir: Path, opset: int, log) -> dict:
        """Writes the graphs beside ``model.onnx`` and returns the manifest entries describing them."""
        return {}

    def validate(self, out_dir: Path, model_path: Path, model, tokenizer, config, dtype: str, manifest: dict):
        """ONNX Runtime against the PyTorch reference (``aligner_export.hf.validate``)."""
        from aligner_export.hf.validate import validate

        return validate(model_path, model, tokenizer, config, dtype=dtype)


@dataclass(frozen=True)
class VisionLanguageFamily(Family):
    """A LLaVA-style model: vision tower + projector + a language model of a text family."""

    language: Family | None = None

    is_multimodal = True

    def language_model(self, model):
        from aligner_export.hf.multimodal import text_lm_of

        return text_lm_of(model)

    @property
    def text_family(self) -> Family:
        return self.language

    def prepare_graph(self, ir_model, hidden_size: int) -> None:
        from aligner_export.hf.multimodal import to_inputs_embeds

        to_inputs_embeds(ir_model, hidden_size)

    def write_extra_graphs(self, model, tokenizer, out_dir: Path, opset: int, log) -> dict:
        from aligner_export.hf.modeling import chat_template_of
        from aligner_export.hf.multimodal import image_spec_of, multimodal_manifest, vision_input_size, write_graphs

        image_spec = image_spec_of(tokenizer)
        features = write_graphs(model, out_dir, image_spec, opset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template = chat_template_of(tokenizer)[0]
        facts = multimodal_manifest(model, tokenizer, template, features, image_spec)
        tile_h, tile_w = vision_input_size(image_spec)
        unit = "tile (any-resolution grid)" if facts.get("anyres") else "image"
        log(f"vision graph: {features} features per {tile_w}x{tile_h} {unit}; embedding graph; image token "
            f"{facts['image_token']} ({facts['placement']} placement)")
        return {"multimodal": facts}

    def validate(self, out_dir: Path, model_path: Path, model, tokenizer, config, dtype: str, manifest: dict):
        from aligner_export.hf.multimodal import image_spec_of, validate_vlm

        return validate_vlm(out_dir, model, tokenizer, config, image_spec_of(tokenizer), manifest[Key.MULTIMODAL],
                            dtype=dtype)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2"),
    Family("qwen3"),
)}

# Vision-language families: model_type -> where the language model's decoder layers sit.
VLM_LAYERS_PATH = {"llava": "model.language_model.layers", "llava_next": "model.language_model.layers"}


def text_config(config):
    """The language model's config: ``config.text_config`` for a vision-language model, else ``config``."""
    return getattr(config, "text_config", None) or config


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type in VLM_LAYERS_PATH:
        text = family_for(text_config(config)) if getattr(config, "text_config", None) is not None else None
        if text is None or text.is_multimodal:
            raise AlignerError(f"{model_type}: the language model's config (text_config) is missing")
        return VisionLanguageFamily(model_type, layers_path=VLM_LAYERS_PATH[model_type], language=text)
    family = FAMILIES.get(model_type)
    if family is None:
        raise AlignerError(f"unsupported architecture '{model_type}': supported are "
                           f"{', '.join(sorted(FAMILIES))} and, as vision-language models, "
                           f"{', '.join(sorted(VLM_LAYERS_PATH))}")
    return family
