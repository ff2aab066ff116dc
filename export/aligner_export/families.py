"""What differs between model families, in one table (see ../shared/STYLE.md, onnxruntime-genai's builders).

The pipeline asks this module, never ``if family == ...``. Every supported text family keeps its decoder layers in
``model.model.layers`` and its residual stream at each decoder layer's output (ARCHITECTURE.md §3). A
vision-language family (LLaVA) wraps one of them: its language model's layers sit at ``model.language_model.layers``
and steering works on that residual stream (issue 6).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner_runtime.errors import AlignerError


@dataclass(frozen=True)
class Family:
    model_type: str
    layers_path: str = "model.layers"  # attribute path from the CausalLM to the decoder layer ModuleList
    optimum_task: str = "text-generation-with-past"
    text_family: "Family | None" = None  # for a vision-language family: the family of its language model

    @property
    def is_multimodal(self) -> bool:
        return self.text_family is not None

    def decoder_layers(self, model):
        module = model
        for part in self.layers_path.split("."):
            module = getattr(module, part)
        return module


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
        return Family(model_type, layers_path=VLM_LAYERS_PATH[model_type], text_family=text)
    family = FAMILIES.get(model_type)
    if family is None:
        raise AlignerError(f"unsupported architecture '{model_type}': supported are "
                           f"{', '.join(sorted(FAMILIES))} and, as vision-language models, "
                           f"{', '.join(sorted(VLM_LAYERS_PATH))}")
    return family
