"""aligner_runtime on real tiny exports: equality with the PyTorch reference, steered decode logits, fail-closed
loading, no torch, concurrency, flat memory, streaming."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from aligner_runtime.api import Aligner
from aligner_runtime.errors import AlignerError
from runtime_exports import DEFAULT_OPTIONS, LINEAR_OPTIONS, steer_config, tiny_export

PROMPT_DIR = Path(__file__).resolve().parents[1] / "export" / "aligner_export" / "data" / "prompts"
NEW_TOKENS = 8


def candidate_prompts() -> list[str]:
    harmful = PROMPT_DIR.joinpath("harmful_heldout.txt").read_text().splitlines()
    harmless = PROMPT_DIR.joinpath("harmless_heldout.txt").read_text().splitlines()
    lines = [p for p in harmful[:30] + harmless[:30] if p.strip() and not p.startswith("#")]
    return lines


def mixed_prompts(aligner, count: int = 3) -> list[str]:
    """``count`` prompts whose gate fires and ``count`` whose gate stays 0, interleaved (lengths differ)."""
    results = aligner.generate(candidate_prompts(), max_new_tokens=1, batch_size=8)
    fired = [r for r, p in zip(results, candidate_prompts()) if r.gate == 1.0]
    fired_prompts = [p for r, p in zip(results, candidate_prompts()) if r.gate == 1.0][:count]
    quiet_prompts = [p for r, p in zip(results, candidate_prompts()) if r.gate == 0.0][:count]
    assert len(fired_prompts) == count and len(quiet_prompts) == count, \
        f"the tiny export's gate does not split the candidates ({len(fired)} of {len(results)} fire)"
    return [p for pair in zip(fired_prompts, quiet_prompts) for p in pair]


@pytest.fixture(scope="module", params=["llama", "qwen3", "llama-inline", "llama-linear", "qwen3-linear-inline"])
def export(request, tmp_path_factory, tiny_model_dir):
    """Tiny exports with the paper gate (SteerGate v1) and with the pack's linear gate (v2 chained over its layers),
    as functions and inlined."""
    family, *variant = request.param.split("-")
    options = LINEAR_OPTIONS if "linear" in variant else DEFAULT_OPTIONS
    if "inline" in variant:
        options = options + (("--steer-impl", "inline"),)
    return tiny_export(tmp_path_factory, tiny_model_dir, family, options)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_model_dir):
    return tiny_export(tmp_path_factory, tiny_model_dir, "llama")


def _reference(model_dir, spec, prompts, max_new_tokens):
    from aligner_export.hf.modeling import chat_texts, load_model, tokenize_batch
    from aligner_export.hf.reference import reference_generate

    model, tokenizer = load_model(model_dir)
    texts, _, _ = chat_texts(tokenizer, prompts)
    batch = tokenize_batch(tokenizer, texts, "left")
    sequences, gate, score = reference_generate(model, spec, batch["input_ids"], batch["attention_mask"],
                                                max_new_tokens=max_new_tokens)
    new = sequences[:, batch["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    truncated = []
    for row in new:
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        truncated.append(row[:end])
    return model, tokenizer, truncated, gate.tolist(), score.tolist()


def test_greedy_equals_reference_with_mixed_gates_in_one_batch(export):
    export_dir, model_dir, pack = export
    aligner = Aligner.load(export_dir)
    prompts = mixed_prompts(aligner)
    results = aligner.generate(prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))
    assert results[0].batch_size == len(prompts) and results[0].prefill_passes == 2
    _, tokenizer, expected, gates, scores = _reference(model_dir, steer_config(export_dir, pack), prompts, NEW_TOKENS)
    for prompt, result, tokens, gate, score in zip(prompts, results, expected, gates, scores):
        assert aligner.encode(prompt) == tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        assert result.gate == gate
        assert result.score == pytest.approx(score, abs=1e-4)
        assert result.token_ids == tokens, prompt
        assert result.text == tokenizer.decode(
            [t for t in tokens if t not in aligner.stop_token_ids], skip_special_tokens=True)


def test_steered_decode_logits_equal_reference(llama_export):
    """Every decode step's logits, per row, against the hooked HF model recomputing the whole sequence."""
    import torch

    from aligner_export.hf.modeling import load_model
    from aligner_export.hf.reference import steered

    export_dir, model_dir, pack = llama_export
    aligner = Aligner.load(export_dir)
    aligner.stop_token_ids = ()  # no row stops early: every step has the whole batch
    prompts = mixed_prompts(aligner, 2)
    recorded = []
    run_step = aligner._backend._run
    aligner._backend._run = lambda feeds: recorded.append(run_step(feeds)) or recorded[-1]
    results = aligner.generate(prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))
    decode_steps = recorded[2:]  # two prefill passes (the batch has fired rows)
    assert len(decode_steps) == NEW_TOKENS - 1
    model, _ = load_model(model_dir)
    spec = steer_config(export_dir, pack)
    for b, (prompt, result) in enumerate(zip(prompts, results)):
        ids = aligner.encode(prompt) + result.token_ids
        with torch.no_grad(), steered(model, spec) as state:
            state.gate_in = torch.tensor([result.gate])
            logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        plen = result.prompt_tokens
        for step, outputs in enumerate(decode_steps):
            np.testing.assert_allclose(outputs["logits"][b, -1], logits[plen + step], rtol=1e-3, atol=1e-3)
            assert outputs["steer_gate"][b] == result.gate
        # and the steering is visible: the gate-1 rows' logits differ from the unsteered model's
        if result.gate == 1.0:
            with torch.no_grad():
                plain = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            assert np.abs(plain[plen:] - logits[plen:]).max() > 1e-2


def test_unsteered_comparison_changes_only_fired_rows(llama_export):
    from aligner_runtime.evaluation import UnsteeredComparison

    export_dir, _, _ = llama_export
    aligner = Aligner.load(export_dir)
    prompts = mixed_prompts(aligner)
    comparison = UnsteeredComparison(aligner)
    steered_results = comparison.steered(prompts, max_new_tokens=NEW_TOKENS)
    unsteered_results = comparison.unsteered(prompts, max_new_tokens=NEW_TOKENS)
    for s, u in zip(steered_results, unsteered_results):
        assert u.gate == 0.0 and u.score == pytest.approx(s.score, abs=1e-5)
        if s.gate == 0.0:
            assert s.token_ids == u.token_ids
    assert any(s.token_ids != u.token_ids for s, u in zip(steered_results, unsteered_results) if s.gate == 1.0)


def _copy(export_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(export_dir, target)
    return target


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "inferaligner.json").read_text())
    manifest.update(changes)
    (path / "inferaligner.json").write_text(json.dumps(manifest))


def _moved_gate(manifest: dict) -> dict:
    layer = manifest["gate"]["layers"][-1]
    return {"gate": {**manifest["gate"], "layers": [layer + 1 if layer == 0 else layer - 1]}}


# Format 3 records the gate's layers, bias and rule once, in "gate"; a top-level copy (formats 1 and 2) is refused.
@pytest.mark.parametrize("change", [lambda m: {"alpha": 1.5}, _moved_gate, lambda m: {"steer_layers": [1, 2]},
                                    lambda m: {"gate": {**m["gate"], "bias": 123.0}},
                                    lambda m: {"gate_layer": m["gate"]["layers"][-1]},
                                    lambda m: {"bias": m["gate"]["bias"]}],
                         ids=["alpha", "gate_layers", "steer_layers", "gate_bias", "gate_layer_copy", "bias_copy"])
def test_tampered_manifest_is_refused(llama_export, tmp_path, change):
    path = _copy(llama_export[0], tmp_path)
    manifest = json.loads((path / "inferaligner.json").read_text())
    _edit_manifest(path, **change(manifest))
    with pytest.raises(AlignerError, match="disagree|sits on layers|SteerGate|SteerShift|contradicts|must not hold"):
        Aligner.load(path)
    with pytest.raises(AlignerError):  # a mismatch is never waived, not even for an unsteered run
        Aligner.load(path, allow_unsteered=True)


def test_tampered_graph_metadata_is_refused(llama_export, tmp_path):
    import onnx

    path = _copy(llama_export[0], tmp_path)
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    entry = next(p for p in model.metadata_props if p.key == "inferaligner.alpha")
    entry.value = "0.5"
    onnx.save(model, str(path / "model.onnx"))
    with pytest.raises(AlignerError, match="disagree on alpha"):
        Aligner.load(path)


@pytest.fixture(scope="module")
def unsteered_export(llama_export, tmp_path_factory):
    """The same tiny model exported by optimum alone (no steering nodes), with the tokenizer files and a manifest
    that records no steering."""
    from optimum.exporters.onnx import main_export

    export_dir, model_dir, _ = llama_export
    out = tmp_path_factory.mktemp("unsteered") / "export"
    import warnings

    with warnings.catch_warnings():
        # optimum's TorchScript tracing warns about its own trace (the steered exporter silences the same in
        # aligner_export.hf.base_export._quiet); the graph is checked by the loads below, not by these warnings.
        warnings.simplefilter("ignore")
        main_export(str(model_dir), output=str(out), task="text-generation-with-past", no_post_process=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(export_dir / name, out / name)
    for extra in out.glob("*.onnx"):
        if extra.name != "model.onnx":
            extra.unlink()
    steered_manifest = json.loads((export_dir / "inferaligner.json").read_text())
    manifest = {k: steered_manifest[k] for k in ("format_version", "chat_template_sha256", "eos_token_ids")}
    (out / "inferaligner.json").write_text(json.dumps(manifest))
    return out


def test_unsteered_graph_needs_the_explicit_switch(unsteered_export, llama_export, tmp_path):
    with pytest.raises(AlignerError, match="refusing .*no steering configuration.*allow_unsteered"):
        Aligner.load(unsteered_export)
    aligner = Aligner.load(unsteered_export, allow_unsteered=True)
    assert not aligner.steered
    result = aligner.generate("Hello there", max_new_tokens=3)
    assert result.gate is None and result.score is None and result.new_tokens >= 1
    # The steered export's manifest beside the plain graph: its steering facts are not in the graph.
    shutil.copytree(unsteered_export, tmp_path / "mixed")
    manifest = json.loads((llama_export[0] / "inferaligner.json").read_text())
    del manifest["io"]
    (tmp_path / "mixed" / "inferaligner.json").write_text(json.dumps(manifest))
    with pytest.raises(AlignerError, match="refusing .*(lacks the steering interface|lacks the metadata|lacks io)"):
        Aligner.load(tmp_path / "mixed")


def test_missing_pieces_are_refused(llama_export, tmp_path):
    with pytest.raises(AlignerError, match="not found"):
        Aligner.load(tmp_path / "nope")
    path = _copy(llama_export[0], tmp_path)
    (path / "inferaligner.json").unlink()
    with pytest.raises(AlignerError, match="no inferaligner.json"):
        Aligner.load(path)
    path = _copy(llama_export[0], tmp_path / "b")
    (path / "tokenizer.json").unlink()
    with pytest.raises(AlignerError, match="tokenizer.json"):
        Aligner.load(path)
    path = _copy(llama_export[0], tmp_path / "c")
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(AlignerError, match="chat_template"):
        Aligner.load(path)


def test_bad_input_is_one_clear_error(llama_export):
    aligner = Aligner.load(llama_export[0])
    with pytest.raises(AlignerError, match="empty prompt"):
        aligner.generate("   ")
    with pytest.raises(AlignerError, match="out of range"):
        aligner.generate_ids([[1, 2, aligner._backend.vocab_size]])
    with pytest.raises(AlignerError, match="out of range"):
        aligner.generate("hi", stop_token_ids=[10 ** 6])
    with pytest.raises(AlignerError, match="invalid sampling parameter"):
        aligner.generate("hi", do_sample=True, top_p=0)
    with pytest.raises(AlignerError, match="unknown backend"):
        Aligner.load(llama_export[0], backend="tflite")
    if aligner.context_length is None:
        pytest.skip("the export records no context length (manifest context_length / max_position_embeddings)")
    with pytest.raises(AlignerError, match="context"):
        aligner.generate("kill " * (aligner.context_length + 10))


def test_tensorrt_backend_without_tensorrt(llama_export, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test covers its absence")
    except ImportError:
        pass
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    (tmp_path / "ENGINE.json").write_text(json.dumps({
        "trt_version": "10.3.0", "compute_capability": "8.7", "export_dir": str(llama_export[0]),
        "manifest_sha256": "0" * 64}))
    with pytest.raises(AlignerError, match="TensorRT is not installed here"):
        Aligner.load(engine, backend="tensorrt")


def test_stream_yields_the_text_and_sampling_is_seeded(llama_export):
    aligner = Aligner.load(llama_export[0])
    stream = aligner.stream("Write a poem about the sea.", max_new_tokens=12)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.result.token_ids == aligner.generate("Write a poem about the sea.", max_new_tokens=12).token_ids
    a = aligner.generate("Write a poem about the sea.", max_new_tokens=12, do_sample=True, seed=7, top_k=20)
    b = aligner.generate("Write a poem about the sea.", max_new_tokens=12, do_sample=True, seed=7, top_k=20)
    assert a.token_ids == b.token_ids


def test_concurrent_calls_from_threads_match_sequential(llama_export):
    aligner = Aligner.load(llama_export[0], threads=1)
    prompts = candidate_prompts()[:8]
    expected = [aligner.generate(p, max_new_tokens=6).token_ids for p in prompts]
    got: dict[int, list[int]] = {}
    errors = []

    def worker(i):
        try:
            for _ in range(2):
                got[i] = aligner.generate(prompts[i], max_new_tokens=6).token_ids
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [got[i] for i in range(len(prompts))] == expected


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident set size")
def test_memory_stays_flat_over_many_generations(llama_export):
    aligner = Aligner.load(llama_export[0])
    prompts = candidate_prompts()
    for i in range(10):  # warm-up: allocator arenas and ORT's buffers reach their working size
        aligner.generate(prompts[i % len(prompts)], max_new_tokens=6)
    before = _rss_mb()
    for i in range(60):
        aligner.generate(prompts[i % len(prompts)], max_new_tokens=6)
    assert _rss_mb() - before < 40, f"RSS grew from {before:.0f} MB to {_rss_mb():.0f} MB over 60 generations"


def test_runtime_imports_and_runs_without_torch(llama_export):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
                    raise ImportError(f'{{name}} is blocked in this test')
        sys.meta_path.insert(0, Block())
        from aligner_runtime import Aligner
        aligner = Aligner.load({str(llama_export[0])!r})
        result = aligner.generate('Write a poem about the sea.', max_new_tokens=4)
        assert result.new_tokens >= 1 and result.gate in (0.0, 1.0)
        assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch was imported'
        print('ok', result.gate)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_onnxruntime_providers_are_configurable(llama_export):
    import onnxruntime as ort

    aligner = Aligner.load(llama_export[0], providers=["cpu"], threads=1)
    assert aligner.providers == ["CPUExecutionProvider"]
    missing = [p for p in ("cuda", "tensorrt")
               if {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[p]
               not in ort.get_available_providers()]
    if not missing:
        pytest.skip("every provider is available here; the refusal of a missing one cannot be shown")
    with pytest.raises(AlignerError, match="not available"):
        Aligner.load(llama_export[0], providers=[missing[0]])
    with pytest.raises(AlignerError, match="threads"):
        Aligner.load(llama_export[0], threads=-1)


def test_export_with_a_strength_schedule_feeds_the_decaying_gate(tmp_path_factory, tiny_model_dir, llama_export):
    """``export --half-life H --strength-floor F``: the manifest and the graph's metadata carry the schedule, a fired
    row is fed ``strength(step)`` on every decode step (the prompt at full strength), a quiet row 0 throughout, and
    the quiet rows' answers are the constant-shift export's, token for token."""
    from aligner_runtime.contract import StrengthSchedule
    from aligner_runtime.onnx_graph import read_graph_summary

    out = tiny_export(tmp_path_factory, tiny_model_dir, "llama",
                      DEFAULT_OPTIONS + (("--half-life", "2"), ("--strength-floor", "0.25")))[0]
    manifest = json.loads((out / "inferaligner.json").read_text())
    assert manifest["strength"] == {"half_life": 2.0, "floor": 0.25}
    assert json.loads(read_graph_summary(out / "model.onnx").metadata["inferaligner.strength"]) == manifest["strength"]
    aligner = Aligner.load(out)
    aligner.stop_token_ids = ()
    prompts = mixed_prompts(aligner, 2)
    fed = []
    run_step = aligner._backend._run
    aligner._backend._run = lambda feeds: fed.append(np.array(feeds["steer_gate_in"])) or run_step(feeds)
    results = aligner.generate(prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))
    schedule = StrengthSchedule(half_life=2.0, floor=0.25)
    decode = fed[2:]  # the scoring prefill and the steered second prefill
    assert len(decode) == NEW_TOKENS - 1
    for step, gate_in in enumerate(decode, start=1):
        expected = [schedule.at(step) if r.gate == 1.0 else 0.0 for r in results]
        np.testing.assert_allclose(gate_in, expected, rtol=1e-6)
    constant = Aligner.load(llama_export[0])
    constant.stop_token_ids = ()
    for prompt, result, plain in zip(prompts, results,
                                     constant.generate(prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts))):
        assert result.gate == plain.gate
        if result.gate == 0.0:
            assert result.token_ids == plain.token_ids, prompt


@pytest.mark.parametrize("args, message", [
    (("--strength-floor", "0.5"), "goes with --half-life"),
    (("--half-life", "0"), "--half-life must be in"),
    (("--half-life", "nan"), "--half-life must be in"),
    (("--half-life", "4", "--strength-floor", "1.5"), "--strength-floor must be in"),
])
def test_bad_strength_options_are_one_line(llama_export, tmp_path, capsys, args, message):
    from aligner_export.commands.cli import main

    export_dir, model_dir, pack = llama_export
    assert main(["export", "--target", str(model_dir), "--pack", str(pack), "-o", str(tmp_path / "out"),
                 *DEFAULT_OPTIONS[0], *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_prefill_in_row_groups_matches_one_call(export, monkeypatch):
    """Long prompts in a large batch are prefilled in groups of rows (the [rows, S, V] logits stay bounded) and the
    groups' KV caches joined: the answers are those of one prefill call (a joined cache once lost its past inputs:
    ORT's 'Missing Input: past_key_values.0.key')."""
    import aligner_runtime.generate as generate

    export_dir = export[0]
    aligner = Aligner.load(export_dir)
    prompts = mixed_prompts(aligner, 3)
    whole = Aligner.load(export_dir)._generate(prompts, compact=False, max_new_tokens=NEW_TOKENS,
                                                batch_size=len(prompts))
    width = max(len(aligner.encode(p)) for p in prompts)
    monkeypatch.setattr(generate, "PREFILL_LOGITS_BYTES", 2 * width * aligner._backend.vocab_size * 4)
    grouped = Aligner.load(export_dir)._generate(prompts, compact=False, max_new_tokens=NEW_TOKENS,
                                                  batch_size=len(prompts))
    assert [(r.token_ids, r.gate) for r in grouped] == [(r.token_ids, r.gate) for r in whole]


def test_kv_cache_rows_replaced_after_a_join_keep_their_memory(llama_export):
    """A joined cache (``OrtKV.join``, as after a row-grouped prefill) holds our own arrays; replacing the fired rows
    (the steered second prefill) must not rebuild it on views of memory it then frees (it once did: garbage, then a
    segmentation fault in the next decode step on SmolLM2)."""
    import gc

    from aligner_runtime.backends.onnxruntime import OrtKV

    backend = Aligner.load(llama_export[0])._backend
    rng = np.random.default_rng(0)

    def cache(rows, seed):
        arrays = {}
        for name in backend.past_names:
            heads, head_dim, dtype = backend.past_spec(name)
            arrays[name] = np.random.default_rng(seed).standard_normal((rows, heads, 5, head_dim)).astype(dtype)
        return OrtKV(backend, rows, None, arrays, 5)

    joined = OrtKV.join([cache(2, 1), cache(2, 2)])
    expected = {k: v.copy() for k, v in joined._host().items()}
    again = cache(2, 3)
    fired = np.array([1, 3])
    for name in expected:
        expected[name][fired] = again._host()[name]
    joined.replace_rows(fired, again)
    del again
    gc.collect()
    junk = [rng.standard_normal(v.shape).astype(v.dtype) for v in expected.values() for _ in range(4)]  # reuse freed memory
    for name, value in joined._host().items():
        np.testing.assert_array_equal(value, expected[name])
        np.testing.assert_array_equal(joined.values[name].numpy(), expected[name])
    assert junk
