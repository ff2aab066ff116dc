"""``aligner-export triton``: the model repository, and that repository served by the real ``tritonserver`` of PyPI's
``nvidia-pytriton`` on tiny exports, queried over HTTP (Triton's generate endpoints) and with ``tritonclient``'s gRPC
streaming: outputs equal to :meth:`Aligner.generate`, concurrent requests with mixed gates, and the model refusing a
tampered export. The server tests need the environment that ``make triton-env`` builds (``build/triton-env``, or
``$ALIGNER_TRITON_ENV``) and skip, with the reason, where it is absent or the server cannot start."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aligner_export.commands.cli import main as export_main
from aligner_runtime.api import Aligner
from runtime_exports import DEFAULT_OPTIONS, LINEAR_OPTIONS, tiny_export

REPO = Path(__file__).resolve().parents[1]
TRITON_ENV = Path(os.environ.get("ALIGNER_TRITON_ENV")
                  or Path(os.environ.get("ALIGNER_NATIVE_BUILD") or REPO / "build") / "triton-env")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir):
    """The tiny llama exported with the paper gate (two-pass prefill) and with the linear gate."""
    return {"paper": tiny_export(tmp_path_factory, tiny_model_dir, "llama", DEFAULT_OPTIONS)[0],
            "linear": tiny_export(tmp_path_factory, tiny_model_dir, "llama", LINEAR_OPTIONS)[0]}


def export_cli(*args) -> int:
    return export_main(["triton", *map(str, args)])


def _edit_manifest(export_dir: Path, **changes) -> None:
    manifest = json.loads((export_dir / "inferaligner.json").read_text())
    manifest.update(changes)
    (export_dir / "inferaligner.json").write_text(json.dumps(manifest))


# --- the repository writer --------------------------------------------------------------------------------------------
def test_repository_layout_and_config(exports, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_cli("--model", exports["paper"], "-o", repo, "--instances", "2", "--max-batch-size", "8",
                      "--threads", "1", "--name", "guarded") == 0
    assert "triton model" in capsys.readouterr().out
    model = repo / "guarded"
    assert sorted(p.relative_to(model).as_posix() for p in model.glob("*")) == ["1", "config.pbtxt"]
    config = (model / "config.pbtxt").read_text()
    for line in ('name: "guarded"', 'backend: "python"', "max_batch_size: 8",
                 "model_transaction_policy { decoupled: true }", "dynamic_batching {",
                 '{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }',
                 '{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
                 '{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }',
                 '{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }',
                 '{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }',
                 '{ name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }',
                 '{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }',
                 '{ name: "steer_gate" data_type: TYPE_FP32 dims: [ 1 ] }',
                 '{ name: "steer_score" data_type: TYPE_FP32 dims: [ 1 ] }',
                 "instance_group [ { count: 2 kind: KIND_CPU } ]",
                 'parameters: { key: "export_dir" value: { string_value: "export" } }'):
        assert line in config, line
    assert "EXECUTION_ENV_PATH" not in config
    template = REPO / "export" / "aligner_export" / "triton" / "model.py"
    assert (model / "1" / "model.py").read_bytes() == template.read_bytes()
    copied = Aligner.load(model / "1" / "export")  # the copy passes every load-time check
    assert copied.export.manifest_sha256 == Aligner.load(exports["paper"]).export.manifest_sha256


def test_an_existing_repository_gains_a_model_that_references_its_export(exports, tmp_path):
    repo = tmp_path / "repo"
    assert export_cli("--model", exports["paper"], "-o", repo) == 0
    assert export_cli("--model", exports["linear"], "-o", repo, "--name", "linear", "--reference-export",
                      "--execution-env", tmp_path) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["inferaligner", "linear"]
    config = (repo / "linear" / "config.pbtxt").read_text()
    assert f'key: "export_dir" value: {{ string_value: "{exports["linear"].resolve()}" }}' in config
    assert f'key: "EXECUTION_ENV_PATH" value: {{ string_value: "{tmp_path.resolve()}" }}' in config
    assert not (repo / "linear" / "1" / "export").exists()


def _unsteered_copy(export_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "unsteered"
    shutil.copytree(export_dir, path)
    manifest = json.loads((path / "inferaligner.json").read_text())
    (path / "inferaligner.json").write_text(json.dumps(
        {k: manifest[k] for k in ("format_version", "chat_template_sha256", "eos_token_ids")}))
    return path


def _tampered_copy(export_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tampered"
    shutil.copytree(export_dir, path)
    _edit_manifest(path, alpha=0.5)
    return path


@pytest.mark.parametrize("case, fragment", [
    ("missing", "not found"),
    ("tampered", "alpha"),
    ("unsteered", "steer"),
    ("name", "model name"),
    ("instances", "--instances"),
    ("batch", "--max-batch-size"),
    ("env", "execution environment not found"),
    ("taken", "exists and is not empty"),
    ("file", "not a directory"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(exports, tmp_path, capsys, case, fragment):
    export_dir, repo, extra = exports["paper"], tmp_path / "repo", []
    if case == "missing":
        export_dir = tmp_path / "nope"
    elif case == "tampered":
        export_dir = _tampered_copy(exports["paper"], tmp_path)
    elif case == "unsteered":
        export_dir = _unsteered_copy(exports["paper"], tmp_path)
    elif case == "name":
        extra = ["--name", "bad/name"]
    elif case == "instances":
        extra = ["--instances", "0"]
    elif case == "batch":
        extra = ["--max-batch-size", "0"]
    elif case == "env":
        extra = ["--execution-env", tmp_path / "no-env"]
    elif case == "taken":
        (repo / "inferaligner" / "1").mkdir(parents=True)
    elif case == "file":
        repo.write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert export_cli("--model", export_dir, "-o", repo, *extra) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing half-written


# --- the real tritonserver --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def triton(exports, tmp_path_factory):
    """tritonserver over a repository with the paper-gate and linear-gate models loaded, and a tampered one."""
    httpx = pytest.importorskip("httpx", reason="the Triton tests query the server with httpx (the dev extra)")
    from aligner_export.triton.server import PytritonServer
    from aligner_runtime.errors import AlignerError

    if not TRITON_ENV.is_dir():
        pytest.skip(f"no Triton environment at {TRITON_ENV} (make triton-env builds it: nvidia-pytriton, numpy<2)")
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    common = ["--execution-env", TRITON_ENV, "--max-batch-size", "4", "--threads", "1", "--max-tokens", "16"]
    assert export_cli("--model", exports["paper"], "-o", repo, "--name", "paper", *common) == 0
    assert export_cli("--model", exports["linear"], "-o", repo, "--name", "linear", *common) == 0
    assert export_cli("--model", exports["paper"], "-o", repo, "--name", "tampered", *common) == 0
    _edit_manifest(repo / "tampered" / "1" / "export", alpha=0.5)  # after the writer checked it
    try:
        server = PytritonServer(TRITON_ENV, repo, root / "work", http_port=_free_port(), grpc_port=_free_port(),
                                extra_args=("--model-control-mode=explicit", "--exit-on-error=false"))
        server.check()
    except AlignerError as exc:
        pytest.skip(f"nvidia-pytriton's tritonserver cannot start here: {exc}")
    with server:
        try:
            server.wait_live(120)
        except AlignerError as exc:
            pytest.skip(f"nvidia-pytriton's tritonserver cannot start here: {exc}")
        for name in ("paper", "linear"):
            loaded = httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=300)
            assert loaded.status_code == 200, f"{name}: {loaded.text} | {server.log_tail()}"
        yield server
    # Shut down cleanly: the models' stubs ended with the server.
    assert server.process.returncode is not None


@pytest.fixture(scope="module")
def aligners(exports):
    return {name: Aligner.load(path, threads=1) for name, path in exports.items()}


@pytest.fixture(scope="module")
def prompts(aligners):
    from test_runtime_export import mixed_prompts

    return {name: mixed_prompts(aligner, 3) for name, aligner in aligners.items()}


def generate(server, model, body, timeout=120):
    import httpx

    return httpx.post(f"{server.url}/v2/models/{model}/generate", json=body, timeout=timeout)


def generate_stream(server, model, body, timeout=120) -> list[dict]:
    import httpx

    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/{model}/generate_stream", json=body,
                      timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


@pytest.mark.parametrize("model", ["paper", "linear"])
def test_generate_equals_generate_alone(triton, aligners, prompts, model):
    gates = set()
    for prompt in prompts[model][:4]:
        expected = aligners[model].generate(prompt, max_new_tokens=NEW_TOKENS)
        response = generate(triton, model, {"text_input": prompt, "max_tokens": NEW_TOKENS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["text_output"] == expected.text
        assert body["steer_gate"] == expected.gate
        assert body["steer_score"] == pytest.approx(expected.score, abs=1e-4)
        gates.add(body["steer_gate"])
    assert gates == {0.0, 1.0}


def test_generate_stream_pieces_add_up(triton, aligners, prompts):
    prompt = prompts["paper"][0]
    expected = aligners["paper"].generate(prompt, max_new_tokens=NEW_TOKENS)
    events = generate_stream(triton, "paper", {"text_input": prompt, "max_tokens": NEW_TOKENS, "stream": True})
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events if "text_output" in e) == expected.text
    assert all(e["steer_gate"] == expected.gate for e in events if "steer_gate" in e)


def test_chat_messages_as_json(triton, aligners):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected = aligners["paper"].generate("Name a colour.", system="You are terse.", max_new_tokens=NEW_TOKENS)
    body = generate(triton, "paper", {"text_input": json.dumps(messages), "max_tokens": NEW_TOKENS}).json()
    assert body["text_output"] == expected.text and body["steer_gate"] == expected.gate


def test_concurrent_http_requests_with_mixed_gates(triton, aligners, prompts):
    jobs = [(model, prompt, budget) for model in ("paper", "linear")
            for prompt, budget in zip(prompts[model], (12, 5, 9, 14, 7, 11))]
    expected = [aligners[m].generate(p, max_new_tokens=n) for m, p, n in jobs]

    def ask(i):
        model, prompt, budget = jobs[i]
        if i % 2:
            events = generate_stream(triton, model, {"text_input": prompt, "max_tokens": budget, "stream": True})
            return "".join(e.get("text_output", "") for e in events), events[0]["steer_gate"]
        body = generate(triton, model, {"text_input": prompt, "max_tokens": budget}).json()
        return body["text_output"], body["steer_gate"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs))))
    assert [a[0] for a in answers] == [r.text for r in expected]
    assert [a[1] for a in answers] == [r.gate for r in expected]


GRPC_CLIENT = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    import tritonclient.grpc as grpcclient

    url, jobs = sys.argv[1], json.loads(sys.stdin.read())
    results = {str(i): {"text": "", "gate": None, "responses": 0} for i in range(len(jobs))}
    finished, lock, errors = threading.Event(), threading.Lock(), []

    def callback(result, error):
        with lock:
            if error is not None:
                errors.append(str(error))
                finished.set()
                return
            response = result.get_response()
            entry = results[response.id]
            text = result.as_numpy("text_output")
            if text is not None:
                entry["text"] += b"".join(text.reshape(-1)).decode("utf-8")
                entry["gate"] = float(result.as_numpy("steer_gate").reshape(-1)[0])
                entry["responses"] += 1
            if response.parameters["triton_final_response"].bool_param:
                entry["final"] = True
                if all(e.get("final") for e in results.values()):
                    finished.set()

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    for i, job in enumerate(jobs):
        inputs = []
        for name, kind, value in (("text_input", "BYTES", np.array([[job["prompt"].encode()]], dtype=object)),
                                  ("max_tokens", "INT32", np.array([[job["max_tokens"]]], dtype=np.int32)),
                                  ("stream", "BOOL", np.array([[job["stream"]]], dtype=bool))):
            tensor = grpcclient.InferInput(name, list(value.shape), kind)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.async_stream_infer(job["model"], inputs, request_id=str(i), enable_empty_final_response=True)
    finished.wait(300)
    client.stop_stream()
    print(json.dumps({"results": results, "errors": errors}))
""")


def test_grpc_streaming_with_tritonclient_and_mixed_gates(triton, aligners, prompts):
    jobs = [{"model": model, "prompt": prompt, "max_tokens": budget, "stream": bool(i % 2)}
            for model in ("paper", "linear")
            for i, (prompt, budget) in enumerate(zip(prompts[model], (13, 6, 10, 8, 15, 4)))]
    expected = [aligners[j["model"]].generate(j["prompt"], max_new_tokens=j["max_tokens"]) for j in jobs]
    run = subprocess.run([str(TRITON_ENV / "bin" / "python"), "-c", GRPC_CLIENT, f"127.0.0.1:{triton.grpc_port}"],
                         input=json.dumps(jobs), capture_output=True, text=True, timeout=360)
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout)
    assert answer["errors"] == []
    for i, (job, result) in enumerate(zip(jobs, expected)):
        got = answer["results"][str(i)]
        assert got["text"] == result.text, job
        assert got["gate"] == result.gate
        assert got.get("final")
        if job["stream"]:  # one response per piece of text, as Aligner.stream yields them
            pieces = list(aligners[job["model"]].stream(job["prompt"], max_new_tokens=job["max_tokens"]))
            assert got["responses"] == len(pieces)
        else:
            assert got["responses"] == 1
    assert any(got["responses"] > 1 for got in answer["results"].values())


@pytest.mark.parametrize("body, fragment", [
    ({"text_input": "hi", "temperature": -1.0}, "temperature"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "   "}, "empty"),
    ({"text_input": json.dumps([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])},
     "single user turn"),
])
def test_bad_requests_are_error_responses_and_the_model_goes_on(triton, body, fragment):
    response = generate(triton, "paper", body)
    assert response.status_code == 400 and fragment in response.json()["error"]
    assert generate(triton, "paper", {"text_input": "Hello", "max_tokens": 2}).status_code == 200


def test_a_tampered_export_does_not_load(triton):
    import httpx

    response = httpx.post(f"{triton.url}/v2/repository/models/tampered/load", timeout=300)
    assert response.status_code == 400
    assert "refusing to load" in response.json()["error"] and "alpha" in response.json()["error"]
    assert httpx.get(f"{triton.url}/v2/models/tampered/ready", timeout=10).status_code != 200
    assert httpx.get(f"{triton.url}/v2/models/paper/ready", timeout=10).status_code == 200


def test_many_clients_at_once_do_not_break_the_model(triton, aligners, prompts):
    """More clients than batch rows: the scheduler queues them; every answer is still the one given alone."""
    prompt = prompts["paper"][1]
    expected = aligners["paper"].generate(prompt, max_new_tokens=6).text
    results, lock = [], threading.Lock()

    def ask(_):
        body = generate(triton, "paper", {"text_input": prompt, "max_tokens": 6}).json()
        with lock:
            results.append(body["text_output"])

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(ask, range(12)))
    assert results == [expected] * 12
