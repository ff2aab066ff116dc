"""``aligner-serve``'s OpenAI-compatible endpoint over plain HTTP (httpx) on 127.0.0.1: answers equal to
:meth:`Aligner.generate` alone (greedy, mixed gates, concurrent clients), streaming over SSE, bad requests as 4xx that
leave the worker running, backpressure (503 + Retry-After), timeouts, client disconnects, health and metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the endpoint tests need httpx (the dev extra)")
uvicorn = pytest.importorskip("uvicorn", reason="aligner-serve needs the serve extra (uvicorn, starlette)")

from aligner_runtime.api import Aligner  # noqa: E402
from aligner_runtime.serving.http import Server, create_app  # noqa: E402
from aligner_runtime.serving.scheduler import Scheduler  # noqa: E402
from runtime_exports import tiny_export  # noqa: E402


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of the test process."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class Slow:
    """A backend whose forward steps take ``delay`` seconds more: long enough to disconnect, time out or fill the
    queue while a request runs."""

    def __init__(self, backend, delay: float):
        self.backend = backend
        self.delay = delay

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        time.sleep(self.delay)
        return self.backend._run(feeds)


@pytest.fixture(scope="module")
def aligner(tmp_path_factory, tiny_model_dir):
    return Aligner.load(tiny_export(tmp_path_factory, tiny_model_dir, "llama")[0], threads=1)


@pytest.fixture(scope="module")
def prompts(aligner):
    from test_runtime_export import mixed_prompts

    return mixed_prompts(aligner, 3)


def serve(aligner, backend=None, *, max_batch_size=8, max_queue=16, request_timeout=60.0, default_max_tokens=16):
    backend = backend or aligner._backend
    scheduler = Scheduler(backend, pad_token_id=aligner.tokenizer.pad_token_id, two_pass=aligner.export.two_pass,
                          context_length=aligner.context_length, max_batch_size=max_batch_size, max_queue=max_queue)
    server = Server(aligner, scheduler, model_name="tiny", default_max_tokens=default_max_tokens,
                    request_timeout=request_timeout)
    return server, LiveServer(create_app(server))


@pytest.fixture(scope="module")
def live(aligner):
    server, live = serve(aligner)
    with live:
        yield server, live.url
    server.scheduler.close()


def chat(prompt: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **fields}


def sse(response) -> list:
    """The ``data:`` payloads of an event stream, ``[DONE]`` as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_and_completion_equal_generate_alone(live, aligner, prompts):
    server, url = live
    for prompt in prompts[:2]:
        expected = aligner.generate(prompt, max_new_tokens=10)
        body = httpx.post(f"{url}/v1/chat/completions", json=chat(prompt, max_tokens=10), timeout=60).json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.new_tokens,
                                 "total_tokens": expected.prompt_tokens + expected.new_tokens}
        assert body["inferaligner"]["gate"] == expected.gate
        assert body["inferaligner"]["score"] == pytest.approx(expected.score, abs=1e-4)
        assert body["inferaligner"]["steered"] == (expected.gate == 1.0)
        completion = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0},
                                timeout=60).json()
        assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == expected.text
        assert completion["inferaligner"]["gate"] == expected.gate


def test_streaming_chat_and_completion(live, aligner, prompts):
    _, url = live
    expected = aligner.generate(prompts[0], max_new_tokens=12)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json=chat(prompts[0], max_tokens=12, stream=True,
                                stream_options={"include_usage": True})) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == expected.new_tokens
    chunks = events[:-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    assert all(c["object"] == "chat.completion.chunk" and c["inferaligner"]["gate"] == expected.gate for c in chunks)

    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": prompts[1], "max_tokens": 12, "temperature": 0, "stream": True}) as response:
        events = sse(response)
    expected = aligner.generate(prompts[1], max_new_tokens=12)
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == expected.text


def test_concurrent_clients_with_mixed_gates_get_what_they_get_alone(live, aligner, prompts):
    _, url = live
    budgets = [14, 6, 11, 9, 16, 7]
    expected = [aligner.generate(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    assert {r.gate for r in expected} == {0.0, 1.0}

    def ask(i):
        if i % 2:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                              json=chat(prompts[i], max_tokens=budgets[i], stream=True)) as response:
                chunks = sse(response)[:-1]
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[0]["inferaligner"]
        body = httpx.post(f"{url}/v1/chat/completions", json=chat(prompts[i], max_tokens=budgets[i]),
                          timeout=120).json()
        return body["choices"][0]["message"]["content"], body["inferaligner"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts)) ))
    for (text, steering), result in zip(answers, expected):
        assert text == result.text
        assert steering["gate"] == result.gate


def test_stop_strings_end_the_answer(live, aligner, prompts):
    _, url = live
    full = aligner.generate(prompts[1], max_new_tokens=16).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    body = httpx.post(f"{url}/v1/chat/completions", json=chat(prompts[1], max_tokens=16, stop=[stop]),
                      timeout=60).json()
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


LONG = "word " * 5000


@pytest.mark.parametrize("payload, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (chat("hi", steer_gate_in=0), 400, "unknown field 'steer_gate_in'"),
    (chat("hi", gate=False), 400, "unknown field 'gate'"),
    (chat("hi", n=2), 400, "'n'"),
    (chat("hi", temperature=-1), 400, "'temperature'"),
    (chat("hi", temperature="hot"), 400, "'temperature'"),
    (chat("hi", top_p=0), 400, "'top_p'"),
    (chat("hi", max_tokens=0), 400, "'max_tokens'"),
    (chat("hi", max_tokens=10 ** 9), 400, "'max_tokens'"),
    (chat("hi", seed=-3), 400, "'seed'"),
    (chat("hi", stop=[""]), 400, "'stop'"),
    (chat("hi", logprobs=True), 400, "'logprobs'"),
    (chat("hi", stream="yes"), 400, "'stream'"),
    (chat("hi", model="gpt-4"), 404, "does not exist"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, 400, "single user turn"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "text parts"),
    (chat(LONG), 400, "context"),
    ({"prompt": [1, 2, 3]}, 400, "token ids"),
    ({"prompt": "hi", "echo": True}, 400, "'echo'"),
    # issue 21: bodies that were 500s (a 5001-digit integer, nesting 100 000 deep, a field nested 50 000 deep)
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400,
     "nested"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', 400, "unknown field"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}", 400,
     "'temperature'"),
    (chat("hi", model=[[[["x"]]]]), 404, "does not exist"),
    (chat("hi", max_tokens=1 << 16), 400, "'max_tokens'"),
], ids=lambda v: v if isinstance(v, (int, str)) else None)
def test_bad_requests_get_a_clear_4xx_and_the_worker_survives(live, payload, status, fragment):
    server, url = live
    endpoint = "/v1/completions" if isinstance(payload, dict) and "prompt" in payload else "/v1/chat/completions"
    if isinstance(payload, bytes):
        response = httpx.post(f"{url}{endpoint}", content=payload, timeout=30,
                              headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{url}{endpoint}", json=payload, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat("Hello", max_tokens=2), timeout=60)
    assert ok.status_code == 200 and server.scheduler.alive


def test_oversized_body_and_wrong_method(live):
    _, url = live
    response = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert httpx.get(f"{url}/v1/chat/completions", timeout=10).status_code == 405
    assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"


def test_full_queue_answers_503_with_retry_after(aligner):
    server, live = serve(aligner, Slow(aligner._backend, 0.05), max_batch_size=1, max_queue=0)
    with live:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, f"{live.url}/v1/chat/completions",
                                  json=chat("Tell me a story", max_tokens=30), timeout=60)
            while server.scheduler.stats()["active"] + server.scheduler.stats()["waiting"] == 0:
                time.sleep(0.01)
            refused = httpx.post(f"{live.url}/v1/chat/completions", json=chat("Hello", max_tokens=3), timeout=30)
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "server_overloaded"
            assert running.result().status_code == 200
    server.scheduler.close()


def test_timeout_ends_the_request(aligner):
    # 0.2 s a step: no answer can reach its end of sequence before the 0.5 s timeout, however the machine is loaded
    server, live = serve(aligner, Slow(aligner._backend, 0.2), request_timeout=0.5)
    with live:
        response = httpx.post(f"{live.url}/v1/chat/completions", json=chat("Tell me a story", max_tokens=200),
                              timeout=60)
        assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
        with httpx.stream("POST", f"{live.url}/v1/completions", timeout=60,
                          json={"prompt": "Tell me a story", "max_tokens": 200, "stream": True}) as streamed:
            events = sse(streamed)
        assert "timed out" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        assert server.scheduler.stats()["timed_out"] == 2
    server.scheduler.close()


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_client_disconnect_cancels_the_request(aligner):
    server, live = serve(aligner, Slow(aligner._backend, 0.05))
    scheduler = server.scheduler
    with live:
        # Streaming: read the first chunk, then hang up; 200 tokens would take 10 s.
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=60,
                          json=chat("Tell me a story", max_tokens=200, stream=True)) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        _wait_for(lambda: scheduler.stats().get("cancelled", 0) == 1 and scheduler.stats()["active"] == 0)
        # Not streaming: the client gives up after 0.5 s.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/chat/completions", json=chat("Tell me a story", max_tokens=200), timeout=0.5)
        _wait_for(lambda: scheduler.stats().get("cancelled", 0) == 2 and scheduler.stats()["active"] == 0)
        assert httpx.post(f"{live.url}/v1/chat/completions", json=chat("Hi", max_tokens=2),
                          timeout=30).status_code == 200
        metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert 'aligner_cancelled_total{reason="disconnect"} 2.0' in metrics
    scheduler.close()


def test_health_and_metrics(live, aligner, prompts):
    server, url = live
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for prompt in prompts[:2]:
        httpx.post(f"{url}/v1/chat/completions", json=chat(prompt, max_tokens=3), timeout=60)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for series in ('aligner_requests_total{endpoint="/v1/chat/completions",status="200"}',
                   'aligner_gate_decisions_total{gate="1"}', 'aligner_gate_decisions_total{gate="0"}',
                   "aligner_completion_tokens_total", "aligner_prompt_tokens_total", "aligner_gate_rate",
                   'aligner_request_duration_seconds_bucket{endpoint="/v1/chat/completions",le="0.5"}',
                   "aligner_time_to_first_token_seconds_count", "aligner_requests_waiting", "aligner_batch_rows"):
        assert series in text, series
    rate = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("aligner_gate_rate ")))
    assert 0.0 < rate < 1.0


def test_unexpected_failures_are_counted_as_500(aligner):
    """An internal failure answers 500 for that request only, and /metrics counts it (issue 21)."""

    class Broken:
        def __getattr__(self, name):
            return getattr(aligner.tokenizer, name)

        def encode_prompt(self, *args, **kwargs):
            raise RuntimeError("a bug")

    server, live = serve(aligner)
    server.aligner = type("A", (), {"tokenizer": Broken(), "context_length": aligner.context_length,
                                    "stop_token_ids": aligner.stop_token_ids, "_backend": aligner._backend})()
    with live:
        response = httpx.post(f"{live.url}/v1/chat/completions", json=chat("Hello", max_tokens=2), timeout=60)
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert 'aligner_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in text, text
        assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
    server.scheduler.close()


def test_aligner_serve_command(aligner, tmp_path):
    export_dir = aligner.export.path
    bad = subprocess.run([sys.executable, "-m", "aligner_runtime.serving.cli", "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = subprocess.run([sys.executable, "-m", "aligner_runtime.serving.cli", "--model", str(export_dir),
                               "--port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "cannot listen" in busy.stderr
    help_text = subprocess.run([sys.executable, "-m", "aligner_runtime.serving.cli", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "--max-batch-size" in help_text
    assert not any(word in help_text for word in ("--gate", "--steer", "--unsteered", "--allow"))  # no gate switch

    process = subprocess.Popen([sys.executable, "-m", "aligner_runtime.serving.cli", "--model", str(export_dir),
                                "--port", "0", "--threads", "1", "--log-level", "warning",
                                "--served-model-name", "tiny"],
                               stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stderr.readline()
        assert "steering on" in banner, banner
        url = banner.split(" on ")[1].split()[0]
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        body = httpx.post(f"{url}/v1/chat/completions", json=chat("Hello", max_tokens=3), timeout=60).json()
        assert body["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
