"""The OpenAI-compatible endpoint of ``aligner-serve`` (issue 13): Starlette on uvicorn, over the scheduler.

    POST /v1/chat/completions   POST /v1/completions   (``"stream": true`` answers with server-sent events)
    GET  /v1/models             GET  /health           GET  /metrics (Prometheus text format)

Every answer carries the gate in the extension object ``"inferaligner": {"gate", "score", "steered"}`` (each
streamed chunk too). Nothing in a request can turn the gate off.

- Backpressure: the scheduler's queue is bounded; past it the answer is ``503`` with ``Retry-After``.
- A request ends with its timeout (``504``, or an error event in a stream), and is cancelled when its client goes
  away (the row leaves the batch at the next step).
- A bad request (malformed JSON, an unknown field, an over-long prompt, a bad sampling value) is a ``4xx`` with an
  OpenAI-style error object; an unexpected failure is a ``500`` for that request only. Neither touches the scheduler.

Starlette, uvicorn and prometheus-client come with the ``serve`` extra; this module imports them, the rest of the
runtime never does.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import time
import uuid

from .. import schema
from ..errors import AlignerError
from .requests import BadRequest, Generation, TextAssembler, _shown, parse_chat, parse_completion
from .scheduler import CANCELLED, TIMEOUT, Event, QueueFull, SchedulerClosed

log = logging.getLogger("aligner_runtime.serving.http")

MAX_BODY_BYTES = 1 << 20
MAX_IMAGE_BODY_BYTES = 16 << 20  # a vision-language export's requests carry their images as data: URLs
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def _imports():
    try:
        for name in ("starlette", "uvicorn", "prometheus_client"):
            importlib.import_module(name)
    except ImportError as exc:
        raise AlignerError(f"the server needs the 'serve' extra ({exc.name} is missing): "
                           f"pip install 'inferaligner-edge[serve]'") from None


class Metrics:
    """The Prometheus series, in a registry of their own (one per app)."""

    def __init__(self, scheduler):
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("aligner_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("aligner_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("aligner_completion_tokens", "tokens generated", registry=r)
        self.gate = Counter("aligner_gate_decisions", "gate decisions at prefill (gate=1: steered)", ["gate"],
                            registry=r)
        self.cancelled = Counter("aligner_cancelled", "requests ended early", ["reason"], registry=r)
        self.latency = Histogram("aligner_request_duration_seconds", "request latency, arrival to last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("aligner_time_to_first_token_seconds", "arrival to first token", ["endpoint"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("aligner_queue_wait_seconds", "arrival to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        Gauge("aligner_gate_rate", "share of admitted requests whose gate fired, since start",
              registry=r).set_function(lambda: self._gate_rate())
        Gauge("aligner_requests_waiting", "requests queued for a batch row", registry=r).set_function(
            lambda: scheduler.stats()["waiting"])
        Gauge("aligner_batch_rows", "rows in the running decode batch", registry=r).set_function(
            lambda: scheduler.stats()["active"])
        self._fired = 0
        self._decided = 0

    def _gate_rate(self) -> float:
        return self._fired / self._decided if self._decided else 0.0

    def decided(self, gate: float | None) -> None:
        fired = gate is not None and gate > 0.5
        self._decided += 1
        self._fired += int(fired)
        self.gate.labels(gate="1" if fired else "0").inc()

    def render(self) -> bytes:
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None):
    # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _steering(gate: float | None, score: float | None) -> dict:
    """The extension object. A score that is not finite is null (valid JSON); such a row was steered."""
    finite = score is not None and math.isfinite(score)
    return {"gate": gate, "score": score if finite else None, "steered": gate is not None and gate > 0.5}


class _Events:
    """Bridges the scheduler thread's events into this event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def listener(self, event: Event) -> None:  # called on the scheduler thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def next(self) -> Event:
        return await self._queue.get()


async def _read_json(request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is over {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit} bytes", status=413)
        chunks.append(chunk)
    try:
        # schema.loads: invalid UTF-8, NaN/Infinity, integers past Python's digit limit and nesting deeper than 64
        # are one refusal here, not an exception later (a RecursionError, a ValueError from int()) that would be a 500
        return schema.loads(b"".join(chunks), "the request body")
    except AlignerError as exc:
        raise BadRequest(str(exc)) from None


async def _disconnected(request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Server:
    """The app's state: the loaded export, its scheduler, the limits and the metrics. ``max_body_bytes``: the
    largest request body (default 1 MiB, 16 MiB for a vision-language export, whose requests carry images)."""

    def __init__(self, aligner, scheduler, *, model_name: str, default_max_tokens: int = 256,
                 request_timeout: float | None = 600.0, max_body_bytes: int | None = None):
        _imports()
        self.aligner = aligner
        self.scheduler = scheduler
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes or (MAX_IMAGE_BODY_BYTES if aligner.multimodal else MAX_BODY_BYTES)
        self.metrics = Metrics(scheduler)
        self.created = int(time.time())

    # --- routes -------------------------------------------------------------------------------------------------------
    async def health(self, request):
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from starlette.responses import JSONResponse

        stats = self.scheduler.stats()
        body = {"status": "ok" if stats["alive"] else "unavailable", "model": self.model_name,
                "active": stats["active"], "waiting": stats["waiting"]}
        return JSONResponse(body, status_code=200 if stats["alive"] else 503)

    async def metrics_endpoint(self, request):
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request):
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "inferaligner-edge"}]})

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completion")

    # --- generation ---------------------------------------------------------------------------------------------------
    async def _generate(self, request, kind: str):
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        arrived = time.monotonic()
        try:
            body = await _read_json(request, self.max_body_bytes)
            limit = self.aligner.context_length
            generation = parse_chat(body, limit, images=self.aligner.multimodal) if kind == "chat" else \
                parse_completion(body, limit)
            if "model" in body and body["model"] not in (None, self.model_name):
                raise BadRequest(f"the model {_shown(body['model'])} does not exist here (this server runs "
                                 f"'{self.model_name}')", "model", status=404, code="model_not_found")
            config = generation.sampling(self.aligner, self.default_max_tokens)
            # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
            from starlette.concurrency import run_in_threadpool

            # the chat template, and a vision-language prompt's images through the vision graph: off the event loop
            ids, embeds = await run_in_threadpool(generation.encode, self.aligner)
            events = _Events(asyncio.get_running_loop())
            handle = self.scheduler.submit(ids, config, timeout=self.request_timeout, listener=events.listener,
                                           prompt_embeds=embeds)
        except BadRequest as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error(exc.status, str(exc), param=exc.param, code=exc.code,
                          kind="invalid_request_error" if exc.status < 500 else "server_error")
        except AlignerError as exc:  # the tokenizer's or the scheduler's refusal: over-long prompt, bad value
            self.metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(exc))
        except QueueFull as exc:
            self.metrics.requests.labels(endpoint, "503").inc()
            return _error(503, str(exc), kind="server_overloaded", code="overloaded",
                          headers={"Retry-After": str(exc.retry_after)})
        except SchedulerClosed as exc:
            self.metrics.requests.labels(endpoint, "503").inc()
            return _error(503, str(exc), kind="server_error", headers={"Retry-After": "5"})

        self.metrics.prompt_tokens.inc(len(ids))
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        text = TextAssembler(self.aligner.tokenizer, config.stop_token_ids, generation.stop)
        run = _Run(self, handle, events, text, endpoint, arrived)
        if generation.stream:
            # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._stream(run, kind, request_id, generation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, run, kind, request_id, len(ids))

    async def _complete(self, request, run: "_Run", kind: str, request_id: str, prompt_tokens: int):
        # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
        from starlette.responses import JSONResponse

        waiter = asyncio.ensure_future(run.finish())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not waiter.done():  # the client went away: the row leaves the batch at the next step
            run.handle.cancel()
            waiter.cancel()
            self.metrics.cancelled.labels("disconnect").inc()
            self.metrics.requests.labels(run.endpoint, "499").inc()
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        finish = waiter.result()
        if finish in ("error", TIMEOUT):
            status = 504 if finish == TIMEOUT else 500
            self.metrics.requests.labels(run.endpoint, str(status)).inc()
            message = "the request timed out" if finish == TIMEOUT else (run.handle.error or "generation failed")
            return _error(status, message, kind="server_error", code="timeout" if finish == TIMEOUT else None)
        handle = run.handle
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "chat":
            body = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name,
                    "choices": [{**choice, "message": {"role": "assistant", "content": run.text.text}}]}
        else:
            body = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": [{**choice, "text": run.text.text}]}
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": run.tokens,
                         "total_tokens": prompt_tokens + run.tokens}
        body["inferaligner"] = _steering(handle.gate, handle.score)
        self.metrics.requests.labels(run.endpoint, "200").inc()
        return JSONResponse(body)

    async def _stream(self, run: "_Run", kind: str, request_id: str, generation: Generation):
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": delta_text or ""} if first else \
                    ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                    "choices": [choice], "inferaligner": _steering(run.handle.gate, run.handle.score)}
            return f"data: {json.dumps(body)}\n\n"

        status = "200"
        try:
            first = True
            async for piece, finish in run.pieces():
                if finish in ("error", TIMEOUT):
                    status = "504" if finish == TIMEOUT else "500"
                    message = "the request timed out" if finish == TIMEOUT else (run.handle.error or "failed")
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    break
                if piece or first or finish:
                    yield chunk(piece, finish, first)
                    first = False
            if generation.include_usage:
                prompt_tokens = len(run.handle.prompt_ids)
                usage = {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": run.tokens,
                                                  "total_tokens": prompt_tokens + run.tokens}}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away
            self.metrics.cancelled.labels("disconnect").inc()
            raise
        finally:
            if not run.handle.done:
                run.handle.cancel()
            self.metrics.requests.labels(run.endpoint, status).inc()


class _Run:
    """One request's events turned into text pieces and a finish reason, with its metrics."""

    def __init__(self, server: Server, handle, events: _Events, text: TextAssembler, endpoint: str, arrived: float):
        self.server = server
        self.handle = handle
        self.events = events
        self.text = text
        self.endpoint = endpoint
        self.arrived = arrived
        self.tokens = 0

    async def pieces(self):
        """``(text piece, None)`` while generating, then ``("", finish_reason)``; finish is ``stop``, ``length``,
        ``timeout`` or ``error``."""
        metrics = self.server.metrics
        while True:
            event = await self.events.next()
            if event.kind == "gate":
                metrics.decided(event.gate)
                if self.handle.admitted is not None:
                    metrics.queue_wait.observe(self.handle.admitted - self.handle.submitted)
            elif event.kind == "token":
                if self.tokens == 0:
                    metrics.ttft.labels(self.endpoint).observe(time.monotonic() - self.arrived)
                self.tokens += 1
                metrics.completion_tokens.inc()
                if self.text.stopped:
                    continue
                piece = self.text.push(event.token)
                if self.text.stopped:  # a stop string: the answer ends here
                    self.handle.cancel()
                    yield piece, None
                    yield "", self._done("stop")
                    return
                if piece:
                    yield piece, None
            elif event.kind == "error":
                yield "", self._done("error")
                return
            elif event.kind == "done":
                if self.text.stopped:
                    return
                reason = event.finish_reason
                if reason == CANCELLED:
                    reason = "stop"
                tail = self.text.flush() if reason != TIMEOUT else ""
                if tail:
                    yield tail, None
                yield "", self._done(reason)
                return

    async def finish(self) -> str:
        reason = None
        async for _, finish in self.pieces():
            reason = finish or reason
        return reason

    def _done(self, reason: str) -> str:
        metrics = self.server.metrics
        if reason == TIMEOUT:
            metrics.cancelled.labels("timeout").inc()
        metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.arrived)
        return reason


def create_app(server: Server):
    """The Starlette application over ``server``. Unexpected failures become a ``500`` for that request."""
    _imports()
    # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
    from starlette.applications import Starlette
    # deferred: the 'serve' extra (Starlette, prometheus-client); checked by _imports()
    from starlette.routing import Route

    async def failed(request, exc):
        log.exception("request failed", exc_info=exc)
        # counted like every other answer, so that a 5xx shows in /metrics (issue 21)
        server.metrics.requests.labels(request.url.path if request.url.path in ENDPOINTS else "other", "500").inc()
        return _error(500, "internal error", kind="server_error")

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: failed})
