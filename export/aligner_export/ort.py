"""ONNX Runtime as the exporter's checks drive it: one CPU session and a step-by-step steered LLM with its KV cache.

The export pipeline (residual-site probe, validation against the PyTorch reference, the quantized-vs-float
comparison) and the vision-language graphs' checks share these; they are torch-free and sit below ``hf/`` so that
any wing of the exporter may use them. The runtime's own sessions are ``aligner_runtime.backends.onnxruntime``'s
(providers, threads and the steering protocol for generation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aligner_runtime.contract import (ATTENTION_MASK, GATE_IN, INPUT_IDS, INPUTS_EMBEDS, POSITION_IDS, is_past,
                                      present_name)

NP_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def ort_session(model_path: Path, level: str = "all", threads: int = 0):
    """A CPU session of ``model_path`` at graph optimization ``level`` (``disable``, ``basic`` or ``all``)."""
    # deferred: onnxruntime comes with an install flavour ([cpu] or [gpu]); aligner-export --help needs neither
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class OrtLM:
    """Drives one steered ONNX LLM session step by step, holding its KV cache as numpy arrays."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in self.inputs if is_past(n)]
        self.outputs = [o.name for o in session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past_names:
            shape = self.inputs[name].shape
            dims = [batch if i == 0 else (0 if not isinstance(d, int) else d) for i, d in enumerate(shape)]
            past[name] = np.zeros(dims, dtype=NP_DTYPE[self.inputs[name].type])
        return past

    def step(self, input_ids, attention_mask, position_ids, past, gate_in,
             inputs_embeds=None) -> dict[str, np.ndarray]:
        feeds = {ATTENTION_MASK: np.asarray(attention_mask, np.int64), GATE_IN: np.asarray(gate_in, np.float32),
                 **past}
        if INPUTS_EMBEDS in self.inputs:  # a vision-language model's language model graph (issue 6)
            if inputs_embeds is None:
                raise ValueError("this graph takes inputs_embeds")
            feeds[INPUTS_EMBEDS] = np.asarray(inputs_embeds, NP_DTYPE[self.inputs[INPUTS_EMBEDS].type])
        else:
            feeds[INPUT_IDS] = np.asarray(input_ids, np.int64)
        if POSITION_IDS in self.inputs:
            feeds[POSITION_IDS] = np.asarray(position_ids, np.int64)
        values = dict(zip(self.outputs, self.session.run(None, feeds)))
        values["past"] = {n: values[present_name(n)] for n in self.past_names}
        return values
