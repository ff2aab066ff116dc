"""The public run-time API.

    from aligner_runtime import Aligner
    aligner = Aligner.load("out/smollm2-export")                # fails closed on an unsteered or mismatched export
    result = aligner.generate("How do I make a cake?", max_new_tokens=64)
    print(result.text, result.gate, result.score)
    for piece in aligner.stream("Tell me a story"):             # text pieces as they are generated
        print(piece, end="", flush=True)
    vlm = Aligner.load("out/llava-export")                      # a vision-language export (issue 6)
    vlm.generate("What is in this picture?", images="cat.png")  # a path, a PIL image or an HxWxC array

The safe API has no way to turn the gate off (docs/architecture.md §5). Evaluation compares with steering disabled only
through :class:`aligner_runtime.evaluation.UnsteeredComparison`.

Thread safety: an :class:`Aligner` may be shared by threads. Each call keeps its own loop state; the ONNX Runtime
backend runs calls concurrently, the TensorRT backend serialises forward steps (one execution context).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import schema, selftest, signing
from .backends.onnxruntime import OnnxRuntimeBackend
from .backends.tensorrt import TensorRTBackend, import_tensorrt, read_stamp
from .contract import BACKENDS, GATE_IN, INPUTS_EMBEDS, MODEL_FILE, STAMP_FILE, EndRule, Key, StrengthSchedule
from .errors import AlignerError
from .generate import GenerationRun, RunTiming, StepModel
from .sampling import SamplingConfig, check_token_ids
from .manifest import ExportDir, load_engine_export, load_export
from .multimodal import ImageEncoder, MultimodalSpec, image_sources
from .tokenizer import ChatTokenizer, IncrementalDecoder


@dataclass
class GenerationResult:
    text: str
    gate: float | None
    score: float | None
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of the batch this prompt ran in
    finish_reason: str
    token_ids: list[int]
    batch_size: int = 1
    prefill_seconds: float = 0.0
    prefill_passes: int = 1

    @property
    def warning(self) -> str | None:
        """Set when the gate's score was not finite (corrupted weights or an overflow): the answer was steered."""
        if self.score is not None and not math.isfinite(self.score):
            return f"the gate score was {self.score} (not finite): the answer was steered (fail closed)"
        return None

    def to_json(self) -> dict:
        """The ``aligner-run --json`` object (docs/architecture.md §7); always valid JSON: a non-finite score is null
        and the object gains a ``warning``."""
        finite = self.score is None or math.isfinite(self.score)
        out = {"text": self.text, "gate": self.gate, "score": self.score if finite else None,
               "new_tokens": self.new_tokens, "seconds": round(self.seconds, 4)}
        if not finite:
            out["warning"] = self.warning
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignerError(f"cannot read {file}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _as_ids(value, where: str) -> list[int]:
    """Token ids given as one int or a list of ints (a generation config's ``eos_token_id``)."""
    if value is None:
        return []
    return schema.field({"eos_token_id": value if isinstance(value, list) else [value]}, "eos_token_id", "int_list",
                        where, lo=0, hi=1 << 31, max_items=64)


class TextStream:
    """Iterator of text pieces for one prompt; ``result`` holds the :class:`GenerationResult` once it is exhausted."""

    def __init__(self, aligner: "Aligner", run: GenerationRun):
        self._aligner = aligner
        self._run = run
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        decoder = IncrementalDecoder(self._aligner.tokenizer)
        stop = set(self._run.config.stop_token_ids)
        start = time.perf_counter()
        for step in self._run:
            for _, token in step:
                if token not in stop:
                    piece = decoder.push(token)
                    if piece:
                        yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        self.result = self._aligner._results(self._run, time.perf_counter() - start)[0]


class Aligner:
    """A loaded export (or engine) with its tokenizer. Create it with :meth:`load`."""

    def __init__(self, export: ExportDir, tokenizer: ChatTokenizer, backend, context_length: int | None,
                 stop_token_ids: tuple[int, ...], image_encoder=None):
        self.export = export
        self.image_encoder = image_encoder  # aligner_runtime.multimodal.ImageEncoder for a vision-language export
        self.tokenizer = tokenizer
        self._backend = backend  # private: its raw step takes any steer_gate_in (docs/integrity.md)
        self.context_length = context_length
        self.stop_token_ids = stop_token_ids
        self.self_test = None  # the load-time steering self-test's report (aligner_runtime.selftest.CanaryReport)
        vocab = backend.vocab_size or tokenizer.vocab_size
        check_token_ids(stop_token_ids, vocab, "stop token")

    @property
    def steered(self) -> bool:
        return self.export.steered

    @property
    def vocab_size(self) -> int:
        """The size of the graph's vocabulary (the tokenizer's where the graph leaves it open)."""
        return self._backend.vocab_size or self.tokenizer.vocab_size

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's execution providers in use (empty for TensorRT)."""
        return list(getattr(self._backend, "providers", []))

    @property
    def manifest(self) -> dict:
        return self.export.manifest

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", *, providers: Sequence | None = None,
             threads: int | None = None, plugins: str | Path | None = None,
             allow_unsteered: bool = False, allow_legacy: bool = False, verify_weights: bool = True,
             trusted_keys=None, expect_sha256: str | None = None, self_test: str | None = None) -> "Aligner":
        """Loads an export dir (``onnxruntime``), or for ``tensorrt`` an engine file or a directory holding the engine
        and its ``ENGINE.json``. The export (manifest, tokenizer) is the stamp's ``export_dir``, else the engine's
        directory. Refuses an unsteered, mismatched or tampered export (``aligner_runtime.manifest``): an unsteered
        one runs only with ``allow_unsteered=True``, an export of manifest format 1 (no integrity digests) only with
        ``allow_legacy=True``. ``verify_weights=False`` skips the digest of the weight files (one read of them).

        ``trusted_keys`` (public key files or directories; default ``$INFERALIGNER_TRUSTED_KEYS`` or the config
        directory, :mod:`aligner_runtime.signing`): when any key is configured only an export signed by one of them
        loads. ``expect_sha256`` pins the export's manifest digest. A steered export then passes the steering
        self-test (:mod:`aligner_runtime.selftest`); ``self_test="no-canary-gate"`` (or ``$INFERALIGNER_SELFTEST``)
        skips only its gate-firing part, for test models with an uncalibrated gate."""
        if backend not in BACKENDS:
            raise AlignerError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
        mode = selftest.resolve_mode(self_test)
        keys = signing.trusted_keys(trusted_keys)
        path = Path(path)
        facts = None  # the graph's steering constants, for the self-test
        if backend == "onnxruntime":
            export = load_export(path, allow_unsteered=allow_unsteered, allow_legacy=allow_legacy,
                                 verify_weights=verify_weights, trusted_keys=keys, expect_sha256=expect_sha256)
            if export.steered:
                facts = selftest.check_constants(export.graph, f"refusing {path}")
            engine = OnnxRuntimeBackend(export.model_path, providers=providers, intra_op_threads=threads)
        else:
            import_tensorrt()
            engine_path = path
            if path.is_dir():  # a directory holding the engine and its stamp (``engine_file`` names the engine)
                stamp_file = path / STAMP_FILE
                name = _read_json(stamp_file).get("engine_file") if stamp_file.is_file() else None
                engine_path = path / (name or "model.engine")
            if not engine_path.exists():
                raise AlignerError(f"engine not found: {engine_path} (build one from an export directory with "
                                   f"aligner-export build --model OUTDIR --plugins LIB -o ENGINE)")

            stamp = read_stamp(engine_path)
            export_dir = Path(stamp.get("export_dir") or engine_path.parent)
            if not export_dir.is_absolute():
                export_dir = engine_path.parent / export_dir
            if (export_dir / MODEL_FILE).is_file():
                export = load_export(export_dir, allow_unsteered=allow_unsteered, allow_legacy=allow_legacy,
                                     verify_weights=verify_weights, trusted_keys=keys, expect_sha256=expect_sha256)
                if export.steered:
                    facts = selftest.check_constants(export.graph, f"refusing {export_dir}")
            else:  # a device deployment may ship the engine without the ONNX graph; the stamp binds the two
                export = load_engine_export(export_dir, trusted_keys=keys, expect_sha256=expect_sha256)
            engine = TensorRTBackend(engine_path, export.manifest_sha256, plugin_library=plugins,
                                     integrity=export.manifest.get(Key.INTEGRITY) if export.steered else None)
            if GATE_IN not in engine.input_names and not allow_unsteered:
                raise AlignerError(f"refusing {engine_path}: the engine has no steering interface; pass "
                                   f"allow_unsteered=True only to run it without safety steering")
        manifest = export.manifest
        multimodal = MultimodalSpec.from_manifest(manifest)
        encoder = None
        if multimodal is not None:
            # The vision and embedding graphs run on ONNX Runtime (``providers``) with either backend; the
            # language model runs on the chosen backend.
            if INPUTS_EMBEDS not in engine.input_names:
                raise AlignerError(f"{path}: the manifest describes a vision-language export but the language model "
                                   f"does not take inputs_embeds")
            encoder = ImageEncoder(export.path, multimodal, providers=providers, threads=threads)
        tokenizer = ChatTokenizer(export.path, expected_template_sha256=manifest.get(Key.CHAT_TEMPLATE_SHA256),
                                  content_parts=multimodal is not None)
        config = _read_json(export.path / "config.json")
        context = manifest.get(Key.CONTEXT_LENGTH) or schema.field(
            config, "max_position_embeddings", "int", str(export.path / "config.json"), default=None, lo=1,
            hi=1 << 24)
        engine_context = getattr(engine, "context_length", None)
        if engine_context and (not context or engine_context < context):
            context = engine_context
        if context:
            tokenizer.max_prompt_tokens = int(context)
        generation = _read_json(export.path / "generation_config.json")
        stops = manifest.get(Key.EOS_TOKEN_IDS) or _as_ids(generation.get("eos_token_id"),
                                                         str(export.path / "generation_config.json"))
        aligner = cls(export, tokenizer, engine, int(context) if context else None, tuple(dict.fromkeys(stops)),
                      image_encoder=encoder)
        if export.steered:
            aligner.self_test = selftest.check_behaviour(aligner, mode, facts)
        return aligner

    @property
    def multimodal(self) -> bool:
        return self.image_encoder is not None

    # --- generation -------------------------------------------------------------------------------------------------
    def sampling_config(self, max_new_tokens=128, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                        stop_token_ids=None) -> SamplingConfig:
        """The checked :class:`SamplingConfig` of :meth:`generate`'s sampling options (the export's EOS ids always
        stop); one :class:`AlignerError` on a bad value, before anything runs."""
        vocab = self.vocab_size
        if self.context_length and isinstance(max_new_tokens, int) and max_new_tokens > self.context_length:
            raise AlignerError(f"invalid sampling parameter: max_new_tokens {max_new_tokens:.0f} is over the export's "
                               f"context length {self.context_length} (prompt and answer share it)"
                               if max_new_tokens < 10 ** 30 else
                               f"invalid sampling parameter: max_new_tokens is over the export's context length "
                               f"{self.context_length}")
        if stop_token_ids is not None:
            check_token_ids(list(stop_token_ids), vocab, "stop token")
        stops = tuple(dict.fromkeys(self.stop_token_ids + tuple(stop_token_ids or ())))
        return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stops).validate(vocab)

    def step_model(self, strength: StrengthSchedule | None = None, end_rule: EndRule | None = None) -> StepModel:
        """The loaded graph as the generation loop sees it (pad token, two-pass rule, context, embedding graph,
        strength schedule and end rule of the export): what :meth:`generate` runs on, and what the serving scheduler
        (``aligner_runtime.serving.scheduler.Scheduler.for_aligner``) is built on. ``strength`` replaces the
        export's schedule and ``end_rule`` its end rule (the evaluation's forced-open sweep)."""
        encoder = self.image_encoder
        if strength is None:
            strength = StrengthSchedule.from_manifest(self.manifest.get(Key.STRENGTH))
        return StepModel(self._backend, pad_token_id=self.tokenizer.pad_token_id, two_pass=self.export.two_pass,
                         context_length=self.context_length, strength=strength,
                         end_rule=EndRule.from_manifest(self.manifest.get(Key.END_RULE)) if end_rule is None
                         else end_rule,
                         end_token_ids=self.stop_token_ids, embedder=encoder.embed if encoder is not None else None)

    def _run(self, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig,
             gate_override: float | None = None, compact: bool = True, prompt_embeds=None,
             strength: StrengthSchedule | None = None, end_rule: EndRule | None = None) -> GenerationRun:
        return GenerationRun.of(self.step_model(strength, end_rule), prompt_ids, config, _gate_override=gate_override,
                                compact=compact, prompt_embeds=prompt_embeds)

    def _results(self, run: GenerationRun, seconds: float) -> list[GenerationResult]:
        timing: RunTiming = run.timing
        out = []
        stop = set(run.config.stop_token_ids)
        for row in run.results:
            answer = row.token_ids[:-1] if row.token_ids and row.token_ids[-1] in stop else row.token_ids
            out.append(GenerationResult(
                text=self.tokenizer.decode(answer), gate=row.gate, score=row.score, prompt_tokens=row.prompt_tokens,
                new_tokens=row.new_tokens, seconds=seconds, finish_reason=row.finish_reason,
                token_ids=row.token_ids, batch_size=len(run.results), prefill_seconds=timing.prefill_seconds,
                prefill_passes=timing.prefill_passes))
        return out

    def encode(self, prompt: str, system: str | None = None, images=None) -> list[int]:
        """Token ids of one prompt; with ``images`` (vision-language exports), image tokens expanded."""
        sources = image_sources(images)
        if self.image_encoder is None:
            if sources:
                raise AlignerError(f"{self.export.path} is a text-only export (no vision graph): it cannot take an "
                                   f"image")
            return self.tokenizer.encode_prompt(prompt, system=system)
        counts = self.image_encoder.tokens_per_image(self.image_encoder.load(sources))
        return self.tokenizer.encode_prompt(prompt, system=system, image_tokens=counts,
                                            multimodal=self.image_encoder.spec)

    def prompt_embeds(self, ids: list[int], images) -> "object | None":
        """A prompt's embeddings with its images' features merged (``[len(ids), H]``), or None for a prompt without
        images: what a vision-language export's language model takes for ``ids`` (:meth:`encode`'s)."""
        sources = image_sources(images)
        if not sources:
            return None
        return self.image_encoder.prompt_embeds(ids, sources)

    def _generate_ids(self, prompt_ids, config: SamplingConfig, batch_size: int,
                      gate_override: float | None, compact: bool = True, images=None,
                      strength: StrengthSchedule | None = None,
                      end_rule: EndRule | None = None) -> list[GenerationResult]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AlignerError(f"batch_size must be a positive integer, got {batch_size!r}")
        results: list[GenerationResult] = []
        images = list(images) if images is not None else [None] * len(prompt_ids)
        for first in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[first:first + batch_size]
            embeds = [self.prompt_embeds(ids, imgs) for ids, imgs in zip(chunk, images[first:first + batch_size])]
            run = self._run(chunk, config, gate_override, compact,
                            prompt_embeds=embeds if any(e is not None for e in embeds) else None, strength=strength,
                            end_rule=end_rule)
            start = time.perf_counter()
            run.run()
            results.extend(self._results(run, time.perf_counter() - start))
        return results

    def _generate(self, prompts, *, system=None, batch_size=1, gate_override=None, compact=True, images=None,
                  strength: StrengthSchedule | None = None, end_rule: EndRule | None = None, **sampling):
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise AlignerError("no prompts given")
        if single:
            per_prompt = [images]
        elif images is None:
            per_prompt = [None] * len(prompt_list)
        else:
            per_prompt = list(images)
            if len(per_prompt) != len(prompt_list):
                raise AlignerError(f"images: {len(per_prompt)} entries for {len(prompt_list)} prompts (give one "
                                   f"entry per prompt, None for a text-only one)")
        config = self.sampling_config(**sampling)
        if self.image_encoder is not None:  # every image is decoded once, before anything runs
                per_prompt = [self.image_encoder.load(image_sources(imgs)) or None for imgs in per_prompt]
        ids = [self.encode(p, system=system, images=imgs) for p, imgs in zip(prompt_list, per_prompt)]
        results = self._generate_ids(ids, config, batch_size, gate_override, compact, images=per_prompt,
                                     strength=strength, end_rule=end_rule)
        return results[0] if single else results

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, system: str | None = None, batch_size: int = 1,
                 images=None):
        """Generates for one prompt (returns a :class:`GenerationResult`) or a list (returns a list, in order).

        Prompts are wrapped in the export's chat template. ``batch_size`` prompts run together, left-padded.
        ``images`` (vision-language exports only): for one prompt, an image or a list of images; for a list of
        prompts, one entry per prompt (None for text only). An image is a path, a PIL image or an HxWxC array.
        """
        return self._generate(prompts, system=system, batch_size=batch_size, images=images,
                              max_new_tokens=max_new_tokens,
                              do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop_token_ids=stop_token_ids)

    def score(self, prompts: str | Sequence[str], *, system=None, batch_size: int = 8):
        """The gate's decision and score for each prompt, from the scoring prefill alone (no generation): what
        :meth:`generate` would decide. ``system``: one system prompt, or one per prompt. Returns ``(gate, score)``
        pairs (one pair for a single prompt)."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise AlignerError("no prompts given")
        systems = list(system) if isinstance(system, (list, tuple)) else [system] * len(prompt_list)
        if len(systems) != len(prompt_list):
            raise AlignerError(f"system: {len(systems)} entries for {len(prompt_list)} prompts")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AlignerError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids = [self.encode(p, system=s) for p, s in zip(prompt_list, systems)]
        out = []
        for first in range(0, len(ids), batch_size):
            gate, score = self._run(ids[first:first + batch_size], self.sampling_config(max_new_tokens=1)).score()
            out += [(float(g), None if score is None else float(v))
                    for g, v in zip(gate, score if score is not None else gate)]
        return out[0] if single else out

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, batch_size: int = 1, **sampling):
        """Like :meth:`generate` for already tokenized prompts (no chat template is applied)."""
        for ids in prompt_ids:
            check_token_ids(list(ids), self.vocab_size, "prompt token")
        return self._generate_ids([list(ids) for ids in prompt_ids], self.sampling_config(**sampling), batch_size, None)

    def stream(self, prompt: str, *, system: str | None = None, images=None, **sampling) -> TextStream:
        """Text pieces of one prompt's answer as they are generated; see :class:`TextStream`."""
        if self.image_encoder is not None:
                images = self.image_encoder.load(image_sources(images)) or None
        ids = self.encode(prompt, system=system, images=images)
        embeds = self.prompt_embeds(ids, images)
        return TextStream(self, self._run([ids], self.sampling_config(**sampling),
                                          prompt_embeds=[embeds] if embeds is not None else None))
