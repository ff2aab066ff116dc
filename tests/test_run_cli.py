"""``aligner-run`` (docs/architecture.md §7): JSON, prompt files, chat, and every bad input -> one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from runtime_exports import tiny_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir):
    return tiny_export(tmp_path_factory, tiny_model_dir, "llama")[0]


def aligner_run(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "aligner_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin, timeout=120)


def test_json_one_object_per_prompt(export_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Write a poem about the sea.\nHow do I make a weapon?\nWhat is the capital of France?\n")
    proc = aligner_run("--model", export_dir, "--prompt-file", prompts, "--max-new-tokens", 5, "--json",
                       "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objects) == 3
    for obj in objects:
        assert set(obj) == {"text", "gate", "score", "new_tokens", "seconds"}
        assert obj["gate"] in (0.0, 1.0) and isinstance(obj["score"], float) and 1 <= obj["new_tokens"] <= 5
    single = aligner_run("--model", export_dir, "--prompt", "How do I make a weapon?", "--max-new-tokens", 5,
                         "--json")
    assert json.loads(single.stdout)["text"] == objects[1]["text"]  # batching does not change the answer


def test_plain_output_and_chat(export_dir):
    proc = aligner_run("--model", export_dir, "--prompt", "Write a poem about the sea.", "--max-new-tokens", 4)
    assert proc.returncode == 0, proc.stderr
    assert "[gate=" in proc.stderr
    chat = aligner_run("--model", export_dir, "--chat", "--max-new-tokens", 3,
                       stdin="Write a poem.\n\nHow do I make a weapon?\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("[gate=") == 2


def test_no_option_turns_the_gate_off():
    from aligner_runtime.cli import build_parser

    options = " ".join(a for action in build_parser()._actions for a in action.option_strings)
    assert "gate" not in options and "unsteer" not in options and "allow" not in options


@pytest.fixture(scope="module")
def tampered(export_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tampered") / "export"
    shutil.copytree(export_dir, path)
    manifest = json.loads((path / "inferaligner.json").read_text())
    manifest["alpha"] = manifest["alpha"] + 1
    (path / "inferaligner.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def stripped(export_dir, tmp_path_factory):
    """The export with its steering interface and nodes' metadata removed: a graph that does not steer."""
    import onnx

    path = tmp_path_factory.mktemp("stripped") / "export"
    shutil.copytree(export_dir, path)
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    kept = [p for p in model.metadata_props if not p.key.startswith("inferaligner.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(path / "model.onnx"))
    return path


def _trt_absent() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


BAD = {
    "missing export dir": (["--model", "{tmp}/nope", "--prompt", "hi"], "not found"),
    "tampered manifest": (["--model", "{tampered}", "--prompt", "hi"], "disagree"),
    "unsteered graph": (["--model", "{stripped}", "--prompt", "hi"], "refusing"),
    "empty prompt": (["--model", "{export}", "--prompt", "  "], "empty prompt"),
    "empty prompt file": (["--model", "{export}", "--prompt-file", "{tmp}/empty.txt"], "empty"),
    "prompt longer than the context": (["--model", "{export}", "--prompt", "{long}"], "context"),
    "token id out of range": (["--model", "{export}", "--prompt", "hi", "--stop-token-id", "999999"],
                              "out of range"),
    "invalid temperature": (["--model", "{export}", "--prompt", "hi", "--do-sample", "--temperature", "-1"],
                            "invalid sampling parameter"),
    "invalid top-p": (["--model", "{export}", "--prompt", "hi", "--top-p", "2"], "invalid sampling parameter"),
    "invalid max-new-tokens": (["--model", "{export}", "--prompt", "hi", "--max-new-tokens", "0"],
                               "--max-new-tokens must be in [1, 32768]"),
    # issue 21: a documented limit, then the export's context (prompt and answer share it)
    "huge max-new-tokens": (["--model", "{export}", "--prompt", "hi", "--max-new-tokens", "1000000000"],
                            "--max-new-tokens must be in [1, 32768]"),
    "max-new-tokens over the context": (["--model", "{export}", "--prompt", "hi", "--max-new-tokens", "32768"],
                                        "over the export's context length"),
    "tensorrt absent": (["--model", "{tmp}/engine/model.engine", "--backend", "tensorrt", "--prompt", "hi"],
                        "TensorRT is not installed here"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(case, export_dir, tampered, stripped, tmp_path):
    if case == "tensorrt absent":
        if not _trt_absent():
            pytest.skip("TensorRT is installed here; this case covers its absence")
        (tmp_path / "engine").mkdir()
        (tmp_path / "engine" / "model.engine").write_bytes(b"\0")
        (tmp_path / "engine" / "ENGINE.json").write_text(json.dumps(
            {"trt_version": "10.3.0", "compute_capability": "8.7", "manifest_sha256": "0" * 64,
             "export_dir": str(export_dir)}))
    if case == "prompt longer than the context":
        manifest = json.loads((export_dir / "inferaligner.json").read_text())
        if not (manifest.get("context_length") or manifest.get("max_position_embeddings")):
            pytest.skip("the export records no context length (manifest context_length / max_position_embeddings)")
    (tmp_path / "empty.txt").write_text("\n")
    args, message = BAD[case]
    values = {"tmp": tmp_path, "tampered": tampered, "stripped": stripped, "export": export_dir,
              "long": "kill " * 400}
    proc = aligner_run(*[a.format(**values) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_an_error_quoting_a_newline_stays_one_line(capsys):
    from aligner_runtime.errors import AlignerError, run_cli

    def fails():
        raise AlignerError("signing key not found: <|im_end|>\nstep 1\r")

    assert run_cli(fails) == 2
    err = capsys.readouterr().err
    assert err == "error: signing key not found: <|im_end|>\\nstep 1\\r\n"
