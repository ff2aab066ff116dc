"""What differs between model families, in one table (see ../shared/STYLE.md, onnxruntime-genai's builders).

The pipeline asks this module, never ``if family == ...``. Every supported family keeps its decoder layers in
``model.model.layers`` and its residual stream at each decoder layer's output (ARCHITECTURE.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner_runtime.errors import AlignerError


@dataclass(frozen=True)
class Family:
    model_type: str
    layers_path: str = "model.layers"  # attribute path from the CausalLM to the decoder layer ModuleList
    optimum_task: str = "text-generation-with-past"

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


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise AlignerError(f"unsupported architecture '{model_type}': supported are {', '.join(sorted(FAMILIES))}")
    return family
