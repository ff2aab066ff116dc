"""Step 1 of the export pipeline (:mod:`aligner_export.hf.export`): the base ONNX graph of a loaded model, before
any steering, with batch, sequence and past length symbolic.

- optimum-onnx, task ``text-generation-with-past`` (from the family table), from the local model directory with the
  hub switched off;
- ``torch.onnx.export(dynamo=True)`` with optimum's graph interface where optimum lacks the architecture;
- the onnxruntime-genai model builder (``--exporter genai``), run in its own venv.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

from aligner_runtime.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, MODEL_FILE, PAST_KINDS, POSITION_IDS,
                                      past_name, present_name)
from aligner_runtime.errors import AlignerError

OPSET = 18


def _quiet():
    """Silences exporter chatter (tracer warnings, progress) so the command prints only what matters."""
    stack = contextlib.ExitStack()
    for name in ("optimum", "transformers"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def base_export(model, out_dir: Path, family, opset: int = OPSET, exporter: str = "auto") -> tuple[Path, str]:
    """Exports the loaded HF ``model`` to ``out_dir/model.onnx``; returns ``(path, exporter name)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    if exporter in ("auto", "optimum"):
        try:
            # deferred: optimum (and the torch it loads), only when a model is exported
            from optimum.exporters.onnx import onnx_export_from_model
            from optimum.exporters.tasks import TasksManager

            TasksManager.get_supported_tasks_for_model_type(model.config.model_type, exporter="onnx",
                                                            library_name="transformers")
        except (KeyError, ValueError) as exc:
            if exporter == "optimum":
                raise AlignerError(f"optimum cannot export {model.config.model_type}: {exc}") from None
        else:
            with _quiet():
                onnx_export_from_model(model, str(out_dir), opset=opset, task=family.optimum_task,
                                       do_validation=False, device="cpu")
            return out_dir / MODEL_FILE, "optimum"
    return torch_export(model, out_dir, opset), "torch.onnx"


def genai_python(python: str | None = None) -> Path:
    """The python of the onnxruntime-genai builder's venv (its own: the builder needs transformers 5)."""
    if python:
        return Path(python)
    home = Path(os.environ.get("INFERALIGNER_HOME", Path.home() / ".cache" / "inferaligner-edge"))
    return home / "venv-genai" / "bin" / "python"


def genai_export(target: Path, out_dir: Path, python: str | None = None, dtype: str = "fp32") -> Path:
    """The onnxruntime-genai model builder's decoder graph of ``target`` (float weights: quantization, if asked,
    comes after the steering rewrite). Returns the path of its ``model.onnx``."""
    exe = genai_python(python)
    if not exe.is_file():
        raise AlignerError(f"--exporter genai needs the builder's venv ({exe} not found): run 'make genai-venv' or "
                           f"pass --genai-python")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), "-m", "onnxruntime_genai.models.builder", "-m", str(target), "-o", str(out_dir), "-p", dtype,
           "-e", "cpu", "-c", str(out_dir / ".cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not (out_dir / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise AlignerError(f"the onnxruntime-genai builder failed on {target}: {tail[-1] if tail else proc.returncode}")
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return out_dir / MODEL_FILE


def torch_export(model, out_dir: Path, opset: int = OPSET) -> Path:
    """``torch.onnx.export(dynamo=True)`` with optimum's graph interface (names and symbolic axes)."""
    # deferred: torch and transformers, only when a model is exported
    import torch
    from transformers import DynamicCache

    config = model.config
    num_layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype

    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            present = []
            for layer in range(num_layers):
                present += [out.past_key_values.layers[layer].keys, out.past_key_values.layers[layer].values]
            return (out.logits, *present)

    batch, seq, past_len = 2, 3, 2
    past = [torch.zeros(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * num_layers)]
    args = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq).repeat(batch, 1), *past)
    past_names = [past_name(i, kv) for i in range(num_layers) for kv in PAST_KINDS]
    names_in = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names]
    names_out = [LOGITS, *(present_name(n) for n in past_names)]
    B, S, P, T = (torch.export.Dim(name) for name in ("batch_size", "sequence_length", "past_sequence_length",
                                                      "total_sequence_length"))
    dynamic = [{0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}] + [{0: B, 2: P}] * (2 * num_layers)
    path = out_dir / MODEL_FILE
    try:
        with _quiet():
            program = torch.onnx.export(Wrapper(model), args, dynamo=True, opset_version=opset,
                                        input_names=names_in, output_names=names_out, dynamic_shapes=dynamic,
                                        external_data=False)
            program.save(str(path))
    except Exception as exc:  # the dynamo exporter raises many kinds; any of them means "cannot export this model"
        raise AlignerError(f"torch.onnx.export could not export {config.model_type}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return path

