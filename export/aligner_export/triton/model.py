"""Triton Python-backend model: an InferAligner export served with its safety steering always on.

Written into ``REPO/NAME/1/model.py`` by ``aligner-export triton`` (aligner_export/triton/model.py); it runs under
Triton's Python backend, where ``triton_python_backend_utils`` exists, and needs ``aligner_runtime`` (the
``inferaligner-edge`` package, without its export extra) in the model's Python environment.

- Loading: ``Aligner.load`` on the export named by the ``export_dir`` parameter (relative to this version
  directory, or absolute). It refuses an unsteered, mismatched or tampered export, and so does this model: the load
  fails with the runtime's message. With an ``engine`` parameter and ``tensorrt`` importable, the TensorRT backend
  runs the engine; otherwise ONNX Runtime runs ``model.onnx`` (``providers``, ``threads``).
- Requests: ``text_input`` (a prompt, or chat messages as JSON; for a vision-language export the user turn may
  hold ``image_url`` parts with ``data:`` URLs, as the OpenAI endpoint takes them), optional ``max_tokens``, ``stream``,
  ``temperature`` (absent: greedy), ``top_p``, ``seed``. Decoupled: with ``stream`` each new piece of text is one
  response; without, one response holds the whole answer. Every response carries ``steer_gate`` and
  ``steer_score``. Nothing a request holds can turn the gate off.
- One continuous-batching scheduler per model instance (``aligner_runtime.serving.scheduler``): requests join the
  running batch at step boundaries, each row with its own gate. Responses are sent from the scheduler's thread.
  A cancelled request (the client went away) leaves the batch at the next step.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from aligner_runtime.api import Aligner
from aligner_runtime.errors import AlignerError
from aligner_runtime.serving.requests import TextAssembler, parse_triton
from aligner_runtime.serving.scheduler import QueueFull, Scheduler, SchedulerClosed

# How often (in tokens) a running request asks Triton whether its client cancelled it.
CANCEL_CHECK_TOKENS = 8


def _parameters(model_config: dict) -> dict:
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def _optional(request, name: str):
    """A scalar input as a Python value, or None when the request does not carry it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"'{name}' must hold one value, got {array.size}")
    return array.reshape(-1)[0].item() if array.dtype != np.object_ else array.reshape(-1)[0]


class _Responder:
    """Turns one request's scheduler events into Triton responses (called on the scheduler thread)."""

    def __init__(self, sender, stream: bool, text):
        self.sender = sender
        self.stream = stream
        self.text = text
        self.handle = None
        self.gate = np.zeros((1, 1), np.float32)
        self.score = np.zeros((1, 1), np.float32)
        self.tokens = 0

    def _response(self, text: str):
        outputs = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                   pb_utils.Tensor("steer_gate", self.gate), pb_utils.Tensor("steer_score", self.score)]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _final(self, response=None):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if response is None:
            self.sender.send(flags=final)
        else:
            self.sender.send(response, flags=final)

    def fail(self, message: str):
        self._final(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))

    def on_event(self, event):
        if event.kind == "gate":
            self.gate = np.array([[event.gate]], np.float32)
            self.score = np.array([[event.score]], np.float32)
        elif event.kind == "token":
            self.tokens += 1
            if self.tokens % CANCEL_CHECK_TOKENS == 0 and self.handle is not None and self.sender.is_cancelled():
                self.handle.cancel()
                return
            piece = self.text.push(event.token)
            if self.text.stopped and self.handle is not None:
                self.handle.cancel()
            if self.stream and piece:
                self.sender.send(self._response(piece))
        elif event.kind == "done":
            if event.finish_reason == "timeout":
                self.fail("the request timed out")
                return
            if event.finish_reason == "cancelled" and not self.text.stopped:
                self._final()  # the client went away: nothing more to say
                return
            tail = self.text.flush()
            if self.stream:
                self._final(self._response(tail) if tail else None)
            else:
                self._final(self._response(self.text.text))
        elif event.kind == "error":
            self.fail(event.message or "generation failed")


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("this model streams tokens: its config must set "
                                                "model_transaction_policy { decoupled: true }")
        params = _parameters(model_config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        export_dir = Path(params.get("export_dir", "export"))
        if not export_dir.is_absolute():
            export_dir = version_dir / export_dir
        providers = [p for p in params.get("providers", "").split(",") if p] or None
        threads = int(params.get("threads") or 0) or None
        engine = params.get("engine") or None
        # docs/integrity.md "Signatures": the trusted keys (comma-separated paths; default: the environment's or the
        # config directory's) and a pinned manifest digest
        keys = [p for p in params.get("trusted_keys", "").split(",") if p] or None
        pin = params.get("expect_sha256") or None
        try:
            if engine:
                if importlib.util.find_spec("tensorrt") is None:
                    pb_utils.Logger.log_warn(f"{args['model_name']}: tensorrt is not installed here; running "
                                             f"{export_dir} on ONNX Runtime instead of the engine {engine}")
                    engine = None
            if engine:
                self.aligner = Aligner.load(engine, backend="tensorrt", plugins=params.get("plugins") or None,
                                            trusted_keys=keys, expect_sha256=pin)
            else:
                self.aligner = Aligner.load(export_dir, providers=providers, threads=threads, trusted_keys=keys,
                                            expect_sha256=pin)
            rows = max(1, int(model_config.get("max_batch_size") or 1))
            self.scheduler = Scheduler.for_aligner(self.aligner, max_batch_size=rows,
                                                   max_queue=int(params.get("max_queue") or 64),
                                                   prefill=params.get("prefill") or "alone",
                                                   name=f"{args['model_instance_name']}-scheduler")
        except AlignerError as exc:
            raise pb_utils.TritonModelException(f"refusing to load {export_dir}: {exc}") from None
        self.max_tokens = int(params.get("max_tokens") or 128)
        timeout = float(params.get("request_timeout") or 0)
        self.request_timeout = timeout if timeout > 0 else None
        pb_utils.Logger.log_info(f"{args['model_instance_name']}: {export_dir} loaded, steering on (gate layer "
                                 f"{self.aligner.export.gate_layer}), {rows} batch rows")

    def execute(self, requests):
        for request in requests:
            self._start(request)
        return None

    def _start(self, request):
        sender = request.get_response_sender()
        responder = None
        try:
            text_input = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
            if text_input.size != 1:
                raise ValueError(f"'text_input' must hold one prompt, got {text_input.size}")
            generation = parse_triton(text_input[0], max_tokens=_optional(request, "max_tokens"),
                                      stream=_optional(request, "stream"),
                                      temperature=_optional(request, "temperature"),
                                      top_p=_optional(request, "top_p"), seed=_optional(request, "seed"),
                                      max_tokens_limit=self.aligner.context_length,
                                      images=self.aligner.multimodal)
            config = generation.sampling(self.aligner, self.max_tokens)
            ids, embeds = generation.encode(self.aligner)
            responder = _Responder(sender, generation.stream,
                                   TextAssembler(self.aligner.tokenizer, config.stop_token_ids, generation.stop))
            responder.handle = self.scheduler.submit(ids, config, timeout=self.request_timeout,
                                                     listener=responder.on_event, prompt_embeds=embeds)
        except (AlignerError, QueueFull, SchedulerClosed, ValueError) as exc:
            _Responder(sender, False, None).fail(str(exc))

    def finalize(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
