"""``aligner-export export``: the base ONNX export, the steering rewrite, validation and the export dir (issue 3).

Pipeline (each step a small function):

1. :mod:`aligner_export.hf.base_export`: optimum-onnx, task ``text-generation-with-past`` (from the family table),
   opset 18, from the local model directory with the hub switched off; ``torch.onnx.export(dynamo=True)`` where
   optimum lacks the architecture. Batch, sequence and past length stay symbolic.
2. :func:`locate.locate_residuals` finds each layer's output; :func:`verify_sites` checks it against forward hooks.
3. :func:`rewrite.apply` bakes SteerGate/SteerShift in; the result passes ``onnx.checker`` with ``full_check``.
4. The manifest, metadata, tokenizer, chat template and generation config are written; the family's validation hook
   (:mod:`aligner_export.hf.hooks`; :func:`validate.validate` for a text model) compares ONNX Runtime with the
   PyTorch reference (unless ``--no-validate``).
5. ``--weights int8|int4``: the validated float graph becomes the reference, its MatMul weights are quantized
   (:mod:`aligner_export.graph.quantize`; the steering stays float32) and :mod:`aligner_export.hf.weights` compares
   the quantized graph with it: gate decisions on held-out prompts (every disagreement reported) and logits within a
   tolerance derived from the weights' own quantization error (docs/performance.md).
6. The integrity digests are computed last, over the final graph.

Everything is written into a temporary directory that becomes OUTDIR only when all steps succeed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.external_data  # noqa: F401  (ir.external_data)

from aligner_runtime import integrity
from aligner_runtime.chat import template_sha256
from aligner_runtime.contract import (ATTENTION_MASK, INPUT_IDS, INPUTS_EMBEDS, MODEL_FILE, POSITION_IDS, SITE,
                                      Key, SteerConfig, position_ids)
from aligner_runtime.errors import AlignerError, atomic_dir
from aligner_runtime.onnx_graph import read_graph_summary

from aligner_export import __version__, progress
from aligner_export.graph import fused, quantize
from aligner_export.graph.files import check_graph, passes_checker, save_ir
from aligner_export.graph.locate import compare_residuals, locate_residuals, materialize
from aligner_export.graph.manifest import set_metadata, steering_record, write_manifest, write_metadata
from aligner_export.graph.rewrite import apply, check_unsteered, default_opset
from aligner_export.hf.base_export import OPSET, base_export, genai_export
from aligner_export.hf.families import family_for, text_config
from aligner_export.hf.hooks import hooks_for
from aligner_export.hf.modeling import chat_template_of, chat_texts, tokenize_batch
from aligner_export.hf.weights import add_weight_metadata, quantize_export, weight_metadata
from aligner_export.ort import OrtLM, ort_session
from aligner_export.pack import file_sha256

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
    weights: object = None  # aligner_export.graph.quantize.WeightFormat; None: float weights in ``dtype``
    gate_agreement: float = 0.99  # least share of held-out prompts whose quantized gate equals the float graph's
    weight_prompts: tuple = ()  # prompts for the quantized-vs-float comparison (default: the shipped held-out sets)
    genai_python: str | None = None  # --exporter genai: the python of the builder's venv
    strength: object = None  # aligner_runtime.contract.StrengthSchedule; None: the paper's constant shift
    end_rule: object = None  # aligner_runtime.contract.EndRule; None or inactive: no end rule in the manifest
    alphas: dict | None = None  # α_l per steered layer (--alpha-profile); None: ``alpha`` on every layer


def probe_batch(tokenizer):
    texts, _, _ = chat_texts(tokenizer, ["Tell me about the history of the bicycle."])
    return tokenize_batch(tokenizer, texts)


def verify_sites(ir_model, sites, model, tokenizer, family, work_dir: Path, rel_tolerance: float) -> None:
    """Checks every located residual tensor against the decoder layer outputs seen by forward hooks."""
    # deferred: torch, only when a model is exported
    import torch

    values = {site.layer: materialize(ir_model.graph, site) for site in sites}
    added = list(values.values())
    ir_model.graph.outputs.extend(added)
    probe_path = work_dir / "probe.onnx"
    try:
        save_ir(ir_model, probe_path)
    finally:
        for _ in added:
            ir_model.graph.outputs.pop()
    batch = probe_batch(tokenizer)
    ids, mask = batch[INPUT_IDS].numpy(), batch[ATTENTION_MASK].numpy().astype(np.int64)
    session = ort_session(probe_path, level="disable")
    feeds = {ATTENTION_MASK: mask, **OrtLM(session).empty_past(ids.shape[0])}
    embeds = next((i for i in session.get_inputs() if i.name == INPUTS_EMBEDS), None)
    if embeds is not None:  # a vision-language model's language model graph: fed the token embeddings
        with torch.no_grad():
            feeds[INPUTS_EMBEDS] = model.get_input_embeddings()(batch[INPUT_IDS]).float().numpy().astype(
                np.float16 if embeds.type == "tensor(float16)" else np.float32)
    else:
        feeds[INPUT_IDS] = ids
    if any(i.name == POSITION_IDS for i in session.get_inputs()):
        feeds[POSITION_IDS] = position_ids(mask)
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
            model(input_ids=batch[INPUT_IDS], attention_mask=batch[ATTENTION_MASK],
                  position_ids=torch.from_numpy(position_ids(mask)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    compare_residuals(onnx_values, hooked, rel_tolerance)
    for path in work_dir.glob("probe.onnx*"):
        path.unlink()


def copy_model_files(target: Path, tokenizer, out_dir: Path) -> tuple[str, bool]:
    """Tokenizer files, ``chat_template.jinja`` (always; the plain fallback when the model has none) and
    ``generation_config.json``. Returns ``(chat_template_sha256, used_fallback)``."""
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
        # deferred: transformers, only when a model is exported
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(tokenizer_config_stub(tokenizer)).save_pretrained(out_dir)
    return template_sha256(template), fallback


def tokenizer_config_stub(tokenizer):
    # deferred: transformers, only when a model is exported
    from transformers import PretrainedConfig

    return PretrainedConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)


def eos_token_ids(target: Path, tokenizer) -> list[int]:
    ids: list[int] = []
    gen = target / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids = list(value) if isinstance(value, list) else ([value] if value is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def steered_manifest(target: Path, pack, pack_path: Path, options: ExportOptions, config: SteerConfig, weights,
                     tokenizer, fingerprint: str, ir_model, exporter: str, template_sha: str, fallback: bool,
                     lm_config) -> dict:
    """The manifest of the steered graph before validation (docs/contract.md); the family's extra graphs, the
    validation and the integrity digests are added by the pipeline as they are made."""
    strength = options.strength.manifest() if options.strength is not None else None
    end_rule = options.end_rule.manifest() if options.end_rule is not None else None
    return {
        **steering_record(config, options.alpha, options.alphas), Key.PACKAGE_VERSION: __version__,
        Key.PACK_SHA256: file_sha256(pack_path), Key.PACK_MODE: pack.mode, Key.TARGET_FINGERPRINT: fingerprint,
        Key.DTYPE: options.dtype, Key.OPSET: default_opset(ir_model), Key.SITE: SITE, Key.EXPORTER: exporter,
        Key.CHAT_TEMPLATE_SHA256: template_sha, Key.CHAT_TEMPLATE_FALLBACK: fallback,
        Key.NUM_LAYERS: int(lm_config.num_hidden_layers), Key.HIDDEN_SIZE: int(lm_config.hidden_size),
        Key.EOS_TOKEN_IDS: eos_token_ids(target, tokenizer),
        Key.CONTEXT_LENGTH: int(lm_config.max_position_embeddings),
        **({Key.STRENGTH: strength} if strength else {}),
        **({Key.END_RULE: end_rule} if end_rule else {}),
        Key.IO: {"inputs": [v.name for v in ir_model.graph.inputs],
                 "outputs": [v.name for v in ir_model.graph.outputs]},
        Key.VALIDATION: None, Key.WEIGHTS: weights.manifest(),
    }


def export_steered(target: Path, pack, pack_path: Path, out_dir: Path, options: ExportOptions, model, tokenizer,
                   fingerprint: str, log=print) -> dict:
    """Runs the whole pipeline into ``out_dir`` (atomically); returns the manifest. What differs for a
    vision-language model is in its family's hooks (:mod:`aligner_export.hf.hooks`)."""
    family = family_for(model.config)
    hooks = hooks_for(family)
    lm = family.language_model(model)
    lm_config = text_config(model.config)
    num_layers = lm_config.num_hidden_layers
    config = options.steering
    weights = options.weights or quantize.weight_format(options.dtype)
    names = ["base export", "residual stream", "steering nodes", *([hooks.extra_stage] if hooks.extra_stage else []),
             "save and check", *(["validation"] if options.validate else []),
             *(["quantisation"] if weights.quantized else []), "integrity digests"]
    with atomic_dir(out_dir) as tmp, progress.Stages(names, "export", log) as stages:
        log = stages.log
        work = Path(tempfile.mkdtemp(prefix=".work.", dir=tmp))
        t0 = time.perf_counter()
        stages.start("base export")
        if options.onnx_file is not None:
            base_path, exporter = Path(options.onnx_file), "external"
        elif options.exporter == "genai":
            base_path = genai_export(target, work / "base", options.genai_python, options.dtype)
            exporter = "onnxruntime-genai"
        else:
            base_path, exporter = base_export(lm, work / "base", family.text_family, exporter=options.exporter)
        options.timings["base_export_s"] = time.perf_counter() - t0
        log(f"base export ({exporter}): {base_path.name}")
        stages.start("residual stream")
        try:
            ir_model = ir.load(str(base_path))
        except Exception as exc:  # protobuf and onnx-ir raise several kinds for a file that is not a model
            raise AlignerError(f"{base_path}: not a readable ONNX model ({type(exc).__name__})") from None
        # Weights in an external data file (the onnxruntime-genai builder writes model.onnx.data) are read in now:
        # every graph written from here on lies elsewhere.
        ir.external_data.load_to_model(ir_model)
        check_unsteered(ir_model.graph)
        hooks.prepare_graph(ir_model, int(lm_config.hidden_size))
        restore_embedding = fused.fold_embedding_transpose(ir_model.graph)
        fused.concrete_kv_dims(ir_model.graph, int(getattr(lm_config, "head_dim", None) or
                                                   lm_config.hidden_size // lm_config.num_attention_heads))
        padding_side = fused.padding_side(ir_model.graph)
        sites = locate_residuals(ir_model.graph, num_layers)
        verify_sites(ir_model, sites, lm, tokenizer, family.text_family, work,
                     1e-3 if options.dtype == "fp32" else 2e-2)
        log(f"residual stream located and verified on {num_layers} layers")
        stages.start("steering nodes")
        apply(ir_model, sites, config)
        if restore_embedding is not None:
            restore_embedding()
        template_sha, fallback = copy_model_files(target, tokenizer, tmp)
        manifest = steered_manifest(target, pack, pack_path, options, config, weights, tokenizer, fingerprint,
                                    ir_model, exporter, template_sha, fallback, lm_config)
        t0 = time.perf_counter()
        if hooks.extra_stage:
            stages.start(hooks.extra_stage)
        manifest.update(hooks.write_extra_graphs(model, tokenizer, tmp, OPSET, log))
        options.timings["extra_graphs_s"] = time.perf_counter() - t0
        proto_meta = onnx.ModelProto()
        set_metadata(proto_meta, manifest)
        ir_model.metadata_props.update({p.key: p.value for p in proto_meta.metadata_props})
        ir_model.metadata_props.update(weight_metadata(manifest))
        model_path = tmp / MODEL_FILE
        t0 = time.perf_counter()
        stages.start("save and check")
        save_ir(ir_model, model_path)
        del ir_model
        if exporter not in ("external", "onnxruntime-genai") or passes_checker(base_path):
            check_graph(model_path)
        else:
            # Graphs from the onnxruntime-genai builder use ORT contrib ops that onnx.checker does not know.
            log(f"onnx.checker skipped: {base_path.name} itself uses ops outside the ONNX standard")
        options.timings["rewrite_save_check_s"] = time.perf_counter() - t0
        shutil.rmtree(work)
        if options.validate:
            t0 = time.perf_counter()
            stages.start("validation")
            result = hooks.validate(tmp, model_path, model, tokenizer, config, options.dtype, manifest, padding_side)
            options.timings["validate_s"] = time.perf_counter() - t0
            manifest[Key.VALIDATION] = result.as_manifest()
            write_metadata(model_path, manifest)
            log(f"validated: max |logit diff| prefill {result.prefill_max_abs_diff:.2e}, "
                f"decode {result.decode_max_abs_diff:.2e} (tolerance {result.tolerance:g}); gates {result.gates}")
        else:
            log("validation skipped (--no-validate)")
        if weights.quantized:
            t0 = time.perf_counter()
            stages.start("quantisation")
            quantize_export(tmp, model_path, manifest, weights, tokenizer, padding_side, options, log)
            options.timings["quantize_s"] = time.perf_counter() - t0
        add_weight_metadata(model_path, manifest)
        t0 = time.perf_counter()
        stages.start("integrity digests")
        manifest[Key.INTEGRITY] = integrity.compute(tmp, read_graph_summary(model_path), config.gate.layers,
                                                  config.steer_layers, config.steer_impl)
        options.timings["integrity_s"] = time.perf_counter() - t0
        write_manifest(tmp, manifest)
    return manifest
