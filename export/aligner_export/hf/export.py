"""``aligner-export export``: the base ONNX export, the steering rewrite, validation and the export dir (issue 3).

Pipeline (each step a small function):

1. :func:`base_export`: optimum-onnx, task ``text-generation-with-past`` (from the family table), opset 18, from the
   local model directory with the hub switched off; ``torch.onnx.export(dynamo=True)`` where optimum lacks the
   architecture. Batch, sequence and past length stay symbolic.
2. :func:`locate.locate_residuals` finds each layer's output; :func:`verify_sites` checks it against forward hooks.
3. :func:`rewrite.apply` bakes SteerGate/SteerShift in; the result passes ``onnx.checker`` with ``full_check``.
4. The manifest, metadata, tokenizer, chat template and generation config are written; :func:`validate.validate`
   compares ONNX Runtime with the PyTorch reference (unless ``--no-validate``).

Everything is written into a temporary directory that becomes OUTDIR only when all steps succeed.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligner_runtime.contract import MODEL_FILE, SITE, STEERING_IO, SteerConfig
from aligner_runtime.errors import AlignerError, atomic_dir

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom for the graph itself
DTYPES = ("fp32", "fp16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json",
                   # vision-language models: the processor's files, for reference (the manifest holds what the
                   # runtime needs)
                   "preprocessor_config.json", "processor_config.json")


@dataclass
class ExportOptions:
    """How to export: the steering configuration and the export's own settings."""

    steering: SteerConfig
    alpha: float
    bias_rule: str
    dtype: str = "fp32"
    validate: bool = True
    onnx_file: Path | None = None  # bring your own ONNX (--onnx)
    exporter: str = "auto"  # auto | optimum | torch
    timings: dict = field(default_factory=dict)


def _quiet():
    """Silences exporter chatter (tracer warnings, progress) so the command prints only what matters."""
    import logging

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


def torch_export(model, out_dir: Path, opset: int = OPSET) -> Path:
    """``torch.onnx.export(dynamo=True)`` with optimum's graph interface (names and symbolic axes)."""
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
    names_in = ["input_ids", "attention_mask", "position_ids"] + \
        [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
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


def probe_batch(tokenizer):
    from aligner_export.hf.modeling import chat_texts, tokenize_batch

    texts, _, _ = chat_texts(tokenizer, ["Tell me about the history of the bicycle."])
    return tokenize_batch(tokenizer, texts)


def verify_sites(ir_model, sites, model, tokenizer, family, work_dir: Path, rel_tolerance: float) -> None:
    """Checks every located residual tensor against the decoder layer outputs seen by forward hooks."""
    import torch

    from aligner_export.graph.locate import compare_residuals, materialize
    from aligner_export.hf.validate import OrtLM, ort_session
    from aligner_runtime.contract import position_ids

    values = {site.layer: materialize(ir_model.graph, site) for site in sites}
    added = list(values.values())
    ir_model.graph.outputs.extend(added)
    probe_path = work_dir / "probe.onnx"
    try:
        _save(ir_model, probe_path)
    finally:
        for _ in added:
            ir_model.graph.outputs.pop()
    batch = probe_batch(tokenizer)
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(np.int64)
    session = ort_session(probe_path, level="disable")
    feeds = {"attention_mask": mask, **OrtLM(session).empty_past(ids.shape[0])}
    embeds = next((i for i in session.get_inputs() if i.name == "inputs_embeds"), None)
    if embeds is not None:  # a vision-language model's language model graph: fed the token embeddings
        with torch.no_grad():
            feeds["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"]).float().numpy().astype(
                np.float16 if embeds.type == "tensor(float16)" else np.float32)
    else:
        feeds["input_ids"] = ids
    if any(i.name == "position_ids" for i in session.get_inputs()):
        feeds["position_ids"] = position_ids(mask)
    outputs = session.run([v.name for v in added], feeds)
    del session
    onnx_values = {layer: out for layer, out in zip(values, outputs)}

    hooked: dict[int, np.ndarray] = {}
    layers = family.decoder_layers(model)
    handles = [layers[l].register_forward_hook(
        lambda _m, _a, out, l=l: hooked.__setitem__(l, (out[0] if isinstance(out, tuple) else out).float().numpy()))
        for l in values]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=torch.from_numpy(position_ids(mask)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    compare_residuals(onnx_values, hooked, rel_tolerance)
    for path in work_dir.glob("probe.onnx*"):
        path.unlink()


def _initializer_bytes(ir_model) -> int:
    total = 0
    for value in ir_model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _save(ir_model, path: Path) -> None:
    import onnx_ir as ir

    if _initializer_bytes(ir_model) > EXTERNAL_DATA_BYTES:
        ir.save(ir_model, str(path), external_data=path.name + "_data")
    else:
        ir.save(ir_model, str(path))


def check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise AlignerError(f"the steered graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


def _passes_checker(path: Path) -> bool:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def copy_model_files(target: Path, tokenizer, out_dir: Path) -> tuple[str, bool]:
    """Tokenizer files, ``chat_template.jinja`` (always; the plain fallback when the model has none) and
    ``generation_config.json``. Returns ``(chat_template_sha256, used_fallback)``."""
    from aligner_runtime.chat import template_sha256

    from aligner_export.hf.modeling import chat_template_of

    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copy2(target / name, out_dir / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template, fallback = chat_template_of(tokenizer)
    (out_dir / "chat_template.jinja").write_text(template)
    if (target / "generation_config.json").is_file():
        shutil.copy2(target / "generation_config.json", out_dir / "generation_config.json")
    else:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(tokenizer_config_stub(tokenizer)).save_pretrained(out_dir)
    return template_sha256(template), fallback


def tokenizer_config_stub(tokenizer):
    from transformers import PretrainedConfig

    return PretrainedConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)


def eos_token_ids(target: Path, tokenizer) -> list[int]:
    import json

    ids: list[int] = []
    gen = target / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids = list(value) if isinstance(value, list) else ([value] if value is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def export_steered(target: Path, pack, pack_path: Path, out_dir: Path, options: ExportOptions, model, tokenizer,
                   fingerprint: str, log=print) -> dict:
    """Runs the whole pipeline into ``out_dir`` (atomically); returns the manifest. What differs for a
    vision-language model is in its family's hooks (``aligner_export.hf.families``)."""
    import onnx
    import onnx_ir as ir

    from aligner_export import __version__
    from aligner_export.graph.locate import locate_residuals
    from aligner_export.graph.manifest import FORMAT_VERSION, set_metadata, write_manifest, write_metadata
    from aligner_export.graph.rewrite import apply, check_unsteered, default_opset
    from aligner_export.hf.families import family_for, text_config
    from aligner_export.pack import file_sha256
    from aligner_runtime import integrity
    from aligner_runtime.onnx_graph import read_graph_summary

    family = family_for(model.config)
    lm = family.language_model(model)
    lm_config = text_config(model.config)
    num_layers = lm_config.num_hidden_layers
    config = options.steering
    with atomic_dir(out_dir) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".work.", dir=tmp))
        t0 = time.perf_counter()
        if options.onnx_file is not None:
            base_path, exporter = Path(options.onnx_file), "external"
        else:
            base_path, exporter = base_export(lm, work / "base", family.text_family, exporter=options.exporter)
        options.timings["base_export_s"] = time.perf_counter() - t0
        log(f"base export ({exporter}): {base_path.name}")
        try:
            ir_model = ir.load(str(base_path))
        except Exception as exc:  # protobuf and onnx-ir raise several kinds for a file that is not a model
            raise AlignerError(f"{base_path}: not a readable ONNX model ({type(exc).__name__})") from None
        check_unsteered(ir_model.graph)
        family.prepare_graph(ir_model, int(lm_config.hidden_size))
        sites = locate_residuals(ir_model.graph, num_layers)
        verify_sites(ir_model, sites, lm, tokenizer, family.text_family, work,
                     1e-3 if options.dtype == "fp32" else 2e-2)
        log(f"residual stream located and verified on {num_layers} layers")
        apply(ir_model, sites, config)
        template_sha, fallback = copy_model_files(target, tokenizer, tmp)
        manifest = {
            "format_version": FORMAT_VERSION, "package_version": __version__,
            "pack_sha256": file_sha256(pack_path), "pack_mode": pack.mode, "target_fingerprint": fingerprint,
            "steer_layers": config.steer_layers, "gate_layer": config.gate_layer, "alpha": float(options.alpha),
            "bias": config.gate.bias, "bias_rule": options.bias_rule, "steer_impl": config.steer_impl,
            "gate": config.gate.manifest(), "two_pass_prefill": config.two_pass, "steering_io": dict(STEERING_IO),
            "dtype": options.dtype, "opset": default_opset(ir_model), "site": SITE, "exporter": exporter,
            "chat_template_sha256": template_sha, "chat_template_fallback": fallback, "num_layers": num_layers,
            "hidden_size": int(lm_config.hidden_size), "eos_token_ids": eos_token_ids(target, tokenizer),
            "context_length": int(lm_config.max_position_embeddings),
            "io": {"inputs": [v.name for v in ir_model.graph.inputs],
                   "outputs": [v.name for v in ir_model.graph.outputs]},
            "validation": None,
        }
        t0 = time.perf_counter()
        manifest.update(family.write_extra_graphs(model, tokenizer, tmp, OPSET, log))
        options.timings["extra_graphs_s"] = time.perf_counter() - t0
        proto_meta = onnx.ModelProto()
        set_metadata(proto_meta, manifest)
        ir_model.metadata_props.update({p.key: p.value for p in proto_meta.metadata_props})
        model_path = tmp / MODEL_FILE
        t0 = time.perf_counter()
        _save(ir_model, model_path)
        del ir_model
        if exporter != "external" or _passes_checker(base_path):
            check_graph(model_path)
        else:
            # Graphs from the onnxruntime-genai builder use ORT contrib ops that onnx.checker does not know.
            log(f"onnx.checker skipped: {base_path.name} itself uses ops outside the ONNX standard")
        options.timings["rewrite_save_check_s"] = time.perf_counter() - t0
        shutil.rmtree(work)
        if options.validate:
            t0 = time.perf_counter()
            result = family.validate(tmp, model_path, model, tokenizer, config, options.dtype, manifest)
            options.timings["validate_s"] = time.perf_counter() - t0
            manifest["validation"] = result.as_manifest()
            write_metadata(model_path, manifest)
            log(f"validated: max |logit diff| prefill {result.prefill_max_abs_diff:.2e}, "
                f"decode {result.decode_max_abs_diff:.2e} (tolerance {result.tolerance:g}); gates {result.gates}")
        else:
            log("validation skipped (--no-validate)")
        t0 = time.perf_counter()
        manifest["integrity"] = integrity.compute(tmp, read_graph_summary(model_path), config.gate.layers,
                                                  config.steer_layers, config.steer_impl)
        options.timings["integrity_s"] = time.perf_counter() - t0
        write_manifest(tmp, manifest)
    return manifest
