"""``aligner-export export``: the base ONNX export, the steering rewrite, validation and the export dir (issue 3).

Pipeline (each step a small function):

1. :func:`base_export`: optimum-onnx, task ``text-generation-with-past`` (from the family table), opset 18, from the
   local model directory with the hub switched off; ``torch.onnx.export(dynamo=True)`` where optimum lacks the
   architecture. Batch, sequence and past length stay symbolic.
2. :func:`locate.locate_residuals` finds each layer's output; :func:`verify_sites` checks it against forward hooks.
3. :func:`rewrite.apply` bakes SteerGate/SteerShift in; the result passes ``onnx.checker`` with ``full_check``.
4. The manifest, metadata, tokenizer, chat template and generation config are written; :func:`validate.validate`
   compares ONNX Runtime with the PyTorch reference (unless ``--no-validate``).
5. ``--weights int8|int4``: the validated float graph becomes the reference, its MatMul weights are quantized
   (:mod:`aligner_export.graph.quantize`; the steering stays float32) and :func:`validate_weights` compares the
   quantized graph with it: gate decisions on held-out prompts (every disagreement reported) and logits within a
   tolerance derived from the weights' own quantization error (docs/performance.md).
6. The integrity digests are computed last, over the final graph.

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

from aligner_runtime.contract import MODEL_FILE, SITE, SteerConfig
from aligner_runtime.errors import AlignerError, atomic_dir
from aligner_runtime.contract import ATTENTION_MASK, INPUTS_EMBEDS, INPUT_IDS, LOGITS, POSITION_IDS, Key
from aligner_runtime.contract.choices import DTYPES

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with headroom for the graph itself
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


def genai_python(python: str | None = None) -> Path:
    """The python of the onnxruntime-genai builder's venv (its own: the builder needs transformers 5)."""
    if python:
        return Path(python)
    home = Path(os.environ.get("INFERALIGNER_HOME", Path.home() / ".cache" / "inferaligner-edge"))
    return home / "venv-genai" / "bin" / "python"


def genai_export(target: Path, out_dir: Path, python: str | None = None, dtype: str = "fp32") -> Path:
    """The onnxruntime-genai model builder's decoder graph of ``target`` (float weights: quantization, if asked,
    comes after the steering rewrite). Returns the path of its ``model.onnx``."""
    import subprocess

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
    names_in = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + \
        [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    names_out = [LOGITS] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
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


# The quantized graph's logits against the float graph's, as a relative RMS error over the vocabulary at each compared
# position, averaged over the positions, may reach LOGIT_ERROR_GAIN times the relative error the quantization puts
# into a MatMul: the weights' own relative Frobenius error (measured on the export's tensors) plus, at accuracy level
# 4, the int8 block quantization of the activations (ACTIVATION_ERROR: a rounding step of absmax/127 over
# activations whose absmax is ~3x their RMS gives 3 / (127 * sqrt(12)) ~ 0.007). The gain covers the error's growth
# through the depth of the network; docs/performance.md gives the measured ratios (1.5-3.6 on SmolLM2 and the tiny
# models, int8 and int4), so 8 leaves a margin of 2 or more and still fails a broken graph (relative error ~1).
LOGIT_ERROR_GAIN = 8.0
ACTIVATION_ERROR = 0.007
HELDOUT_PROMPTS = ("harmful_heldout.txt", "harmless_heldout.txt")


def weight_validation_prompts() -> list[tuple[str, str]]:
    """``(set, prompt)`` pairs: the shipped held-out prompt sets (never used by calibration) and the validation
    pair of :mod:`aligner_export.hf.validate`."""
    from aligner_export.corpus import PROMPTS_DIR
    from aligner_export.hf.validate import PROMPTS
    from aligner_runtime.prompts import load_prompts

    pairs = [("validation", p) for p in PROMPTS]
    for name in HELDOUT_PROMPTS:
        pairs += [(name.split("_")[0], p) for p in load_prompts(PROMPTS_DIR / name)]
    return pairs


def _last_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's logits at its last real position (left or right padding)."""
    width = mask.shape[1]
    last = width - 1 - np.argmax(mask[:, ::-1], axis=1)
    offset = width - logits.shape[1]
    return logits[np.arange(logits.shape[0]), last - offset]


def validate_weights(reference_path: Path, model_path: Path, tokenizer, fmt, weight_error: float,
                     padding_side: str, prompts=None, min_agreement: float = 0.99, batch_size: int = 8,
                     decode_steps: int = 3, log=print) -> dict:
    """The quantized graph against the float graph it was made from, both on ONNX Runtime.

    - Gates: a scoring prefill (``steer_gate_in = -1``) of every prompt on both; each disagreement is reported with
      both scores. Fails below ``min_agreement``.
    - Logits: at each row's last prompt position, then over ``decode_steps`` greedy decode steps of the first batch
      (the float graph's tokens and gates fed to both): relative RMS error over the vocabulary, its mean bounded
      by ``LOGIT_ERROR_GAIN * (weight_error + ACTIVATION_ERROR at accuracy level 4)``; its maximum and the greedy
      top-1 agreement are reported.
    """
    from aligner_export.hf.modeling import chat_texts, tokenize_batch
    from aligner_export.hf.validate import OrtLM, ort_session
    from aligner_runtime.contract import GATE_OUT, SCORE_OUT, position_ids

    pairs = list(prompts) if prompts else weight_validation_prompts()
    reference, quantized = OrtLM(ort_session(reference_path)), OrtLM(ort_session(model_path))
    from aligner_export import progress

    disagreements, rel_errors, top1 = [], [], []
    agree = 0
    for first in progress.iterate(range(0, len(pairs), batch_size), f"{fmt.name} vs float", "batch"):
        chunk = pairs[first:first + batch_size]
        texts, _, _ = chat_texts(tokenizer, [p for _, p in chunk])
        batch = tokenize_batch(tokenizer, texts, padding_side=padding_side)
        ids, mask = batch[INPUT_IDS].numpy(), batch[ATTENTION_MASK].numpy().astype(np.int64)
        pos = position_ids(mask)
        rows = ids.shape[0]
        outs = [lm.step(ids, mask, pos, lm.empty_past(rows), np.full(rows, -1.0, np.float32))
                for lm in (reference, quantized)]
        for i, (which, prompt) in enumerate(chunk):
            gates = [float(o[GATE_OUT][i]) for o in outs]
            if gates[0] == gates[1]:
                agree += 1
            else:
                disagreements.append({"set": which, "prompt": prompt, "reference_gate": gates[0],
                                      "gate": gates[1], "reference_score": float(outs[0][SCORE_OUT][i]),
                                      "score": float(outs[1][SCORE_OUT][i])})
        logits = [_last_logits(o[LOGITS], mask).astype(np.float64) for o in outs]
        rel_errors += list(np.linalg.norm(logits[1] - logits[0], axis=-1) / np.linalg.norm(logits[0], axis=-1))
        top1 += list(logits[0].argmax(-1) == logits[1].argmax(-1))
        if first == 0 and decode_steps:
            gate = outs[0][GATE_OUT].astype(np.float32)
            steps = [lm.step(ids, mask, pos, lm.empty_past(rows), gate) for lm in (reference, quantized)]
            step_mask = mask
            for _ in range(decode_steps):
                token = _last_logits(steps[0][LOGITS], step_mask).argmax(-1).reshape(rows, 1).astype(np.int64)
                step_mask = np.concatenate([step_mask, np.ones((rows, 1), np.int64)], axis=1)
                step_pos = position_ids(step_mask)[:, -1:]
                steps = [lm.step(token, step_mask, step_pos, s["past"], gate)
                         for lm, s in zip((reference, quantized), steps)]
                a, b = (s[LOGITS][:, -1].astype(np.float64) for s in steps)
                rel_errors += list(np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1))
                top1 += list(a.argmax(-1) == b.argmax(-1))
    count = len(pairs)
    tolerance = LOGIT_ERROR_GAIN * (weight_error + (ACTIVATION_ERROR if fmt.accuracy_level == 4 else 0.0))
    result = {
        "format": fmt.name, "reference": "the validated float graph of this export", "prompts": count,
        "prompt_sets": "validate.PROMPTS + data/prompts/harmful_heldout.txt + harmless_heldout.txt"
        if not prompts else "given", "padding_side": padding_side,
        "gates_agree": agree, "gate_agreement": agree / count, "min_gate_agreement": min_agreement,
        "gate_disagreements": disagreements,
        "missed": sum(d["reference_gate"] > d["gate"] for d in disagreements),
        "weight_rel_error": weight_error, "logit_rel_rms": float(max(rel_errors)),
        "logit_rel_rms_mean": float(np.mean(rel_errors)),
        "logit_rel_rms_tolerance": tolerance,
        "tolerance_rule": f"mean relative RMS logit error <= {LOGIT_ERROR_GAIN:g} x (relative weight error"
                          f"{f' + {ACTIVATION_ERROR:g} int8 activations' if fmt.accuracy_level == 4 else ''})",
        "top1_agreement": float(np.mean(top1)), "decode_steps": decode_steps,
    }
    for d in disagreements:
        log(f"  gate disagreement ({d['set']}): float {d['reference_gate']:.0f} (score {d['reference_score']:+.3f}) "
            f"vs {fmt.name} {d['gate']:.0f} (score {d['score']:+.3f}): {d['prompt'][:70]!r}")
    if agree / count < min_agreement:
        raise AlignerError(f"{fmt.name} weights: the gate agrees with the float graph on {agree}/{count} held-out "
                           f"prompts ({agree / count:.1%} < {min_agreement:.0%}); the quantized gate is not "
                           f"trustworthy (lower --min-gate-agreement only knowingly)")
    if not result["logit_rel_rms_mean"] <= tolerance:
        raise AlignerError(f"{fmt.name} weights: relative logit error {result['logit_rel_rms_mean']:.3g} exceeds "
                           f"{tolerance:.3g} ({result['tolerance_rule']}, weight error {weight_error:.3g})")
    return result


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
    import onnx_ir.external_data  # noqa: F401  (ir.external_data)

    from aligner_export import __version__, progress
    from aligner_export.graph import fused, quantize
    from aligner_export.graph.locate import locate_residuals
    from aligner_export.graph.manifest import set_metadata, steering_record, write_manifest, write_metadata
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
    weights = options.weights or quantize.weight_format(options.dtype)
    names = ["base export", "residual stream", "steering nodes", *(["vision and embedding graphs"]
             if family.is_multimodal else []), "save and check", *(["validation"] if options.validate else []),
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
        family.prepare_graph(ir_model, int(lm_config.hidden_size))
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
        manifest = {
            **steering_record(config, options.alpha), "package_version": __version__,
            "pack_sha256": file_sha256(pack_path), "pack_mode": pack.mode, "target_fingerprint": fingerprint,
            "dtype": options.dtype, "opset": default_opset(ir_model), "site": SITE, "exporter": exporter,
            "chat_template_sha256": template_sha, "chat_template_fallback": fallback, "num_layers": num_layers,
            "hidden_size": int(lm_config.hidden_size), "eos_token_ids": eos_token_ids(target, tokenizer),
            "context_length": int(lm_config.max_position_embeddings),
            **({"strength": options.strength.manifest()}
               if options.strength is not None and options.strength.manifest() else {}),
            **({"end_rule": options.end_rule.manifest()}
               if options.end_rule is not None and options.end_rule.manifest() else {}),
            "io": {"inputs": [v.name for v in ir_model.graph.inputs],
                   "outputs": [v.name for v in ir_model.graph.outputs]},
            "validation": None, "weights": weights.manifest(),
        }
        t0 = time.perf_counter()
        if family.is_multimodal:
            stages.start("vision and embedding graphs")
        manifest.update(family.write_extra_graphs(model, tokenizer, tmp, OPSET, log))
        options.timings["extra_graphs_s"] = time.perf_counter() - t0
        proto_meta = onnx.ModelProto()
        set_metadata(proto_meta, manifest)
        ir_model.metadata_props.update({p.key: p.value for p in proto_meta.metadata_props})
        ir_model.metadata_props.update(weight_metadata(manifest))
        model_path = tmp / MODEL_FILE
        t0 = time.perf_counter()
        stages.start("save and check")
        _save(ir_model, model_path)
        del ir_model
        if exporter not in ("external", "onnxruntime-genai") or _passes_checker(base_path):
            check_graph(model_path)
        else:
            # Graphs from the onnxruntime-genai builder use ORT contrib ops that onnx.checker does not know.
            log(f"onnx.checker skipped: {base_path.name} itself uses ops outside the ONNX standard")
        options.timings["rewrite_save_check_s"] = time.perf_counter() - t0
        shutil.rmtree(work)
        if options.validate:
            t0 = time.perf_counter()
            stages.start("validation")
            if padding_side == "right" and not family.is_multimodal:
                # GroupQueryAttention graphs take right-padded batches (aligner_export.graph.fused).
                from aligner_export.hf.validate import validate

                result = validate(model_path, model, tokenizer, config, dtype=options.dtype, padding_side="right")
            else:
                result = family.validate(tmp, model_path, model, tokenizer, config, options.dtype, manifest)
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


def weight_metadata(manifest: dict) -> dict[str, str]:
    """``inferaligner.weights`` for the graph's metadata_props (the manifest's ``weights``, JSON)."""
    import json

    from aligner_runtime.contract import METADATA_PREFIX

    return {METADATA_PREFIX + "weights": json.dumps(manifest[Key.WEIGHTS], sort_keys=True)}


def add_weight_metadata(model_path: Path, manifest: dict) -> None:
    """Puts ``inferaligner.weights`` back after ``write_metadata`` (which writes the shared key facts only)."""
    import onnx

    from aligner_runtime.errors import atomic_path

    model = onnx.load(str(model_path), load_external_data=False)
    wanted = weight_metadata(manifest)
    present = {p.key: p.value for p in model.metadata_props}
    if all(present.get(k) == v for k, v in wanted.items()):
        return
    kept = [p for p in model.metadata_props if p.key not in wanted]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in wanted.items():
        model.metadata_props.add(key=key, value=value)
    with atomic_path(model_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def _save_proto(model, path: Path) -> None:
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=path.name + "_data" if large else None)


def quantize_export(out_dir: Path, model_path: Path, manifest: dict, fmt, tokenizer, padding_side: str,
                    options: ExportOptions, log=print) -> None:
    """Replaces ``model.onnx`` by its weight-quantized form and, when validating, compares it with the float graph
    (:func:`validate_weights`); the float graph is removed afterwards."""
    import onnx

    from aligner_export.graph import quantize

    reference_dir = Path(tempfile.mkdtemp(prefix=".reference.", dir=out_dir))
    try:
        reference_path = reference_dir / MODEL_FILE
        for path in list(out_dir.glob(MODEL_FILE + "*")):
            path.rename(reference_dir / path.name)
        reference = onnx.load(str(reference_path))
        quantized = quantize.quantize(onnx.load(str(reference_path)), fmt)
        if not quantize.steering_constants_unchanged(reference, quantized):
            raise AlignerError("weight quantization changed a steering node or function; refusing the export")
        weight_error = quantize.relative_weight_error(reference, quantized)
        del reference
        _save_proto(quantized, model_path)
        del quantized
        log(f"weights quantized to {fmt.name} (MatMulNBits, block {fmt.block_size}); relative weight error "
            f"{weight_error:.4f}")
        if options.validate:
            result = validate_weights(reference_path, model_path, tokenizer, fmt, weight_error, padding_side,
                                      prompts=options.weight_prompts, min_agreement=options.gate_agreement, log=log)
            manifest[Key.VALIDATION]["weights"] = result
            from aligner_export.graph.manifest import write_metadata

            write_metadata(model_path, manifest)
            log(f"{fmt.name} vs float graph: gates agree on {result['gates_agree']}/{result['prompts']} prompts, "
                f"relative logit error mean {result['logit_rel_rms_mean']:.3g} (tolerance "
                f"{result['logit_rel_rms_tolerance']:.3g}), max {result['logit_rel_rms']:.3g}; greedy top-1 "
                f"agreement {result['top1_agreement']:.3f}")
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)
