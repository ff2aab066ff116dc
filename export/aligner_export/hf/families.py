"""What differs between model families, in one place (as onnxruntime-genai's builders do).

The pipeline asks the family object, never ``if family == ...`` or ``if multimodal``. Every supported text family
keeps its decoder layers in ``model.model.layers`` and its residual stream at each decoder layer's output
(docs/architecture.md §3). A vision-language family (LLaVA, LLaVA-NeXT) wraps one of them: its language model's
layers sit at ``model.language_model.layers`` and steering works on that residual stream (issue 6,
docs/multimodal.md).

This is the bottom table of ``hf/``: it imports no other module of the package. What the export pipeline does
differently for a family kind (the vision and embedding graphs of a vision-language model, its validation over three
graphs) is that kind's entry in :mod:`aligner_export.hf.hooks`, one level up.
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner_runtime.errors import AlignerError


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

    def language_model(self, model):
        """The causal LM whose graph is exported and steered."""
        return model

    @property
    def text_family(self) -> "Family":
        """The family of :meth:`language_model`."""
        return self


@dataclass(frozen=True)
class VisionLanguageFamily(Family):
    """A LLaVA-style model: vision tower + projector + a language model of a text family."""

    language: Family | None = None

    is_multimodal = True

    def language_model(self, model):
        """A ``*ForCausalLM`` that shares the VLM's language model and LM head modules (no weights are copied)."""
        # deferred: torch and transformers, only once a model is loaded
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(model.config.text_config)
        lm.model = model.model.language_model
        lm.lm_head = model.lm_head
        lm.eval()
        return lm

    @property
    def text_family(self) -> Family:
        return self.language


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
