"""The end rule of a steered answer (docs/contract.md "Ending a steered answer", issue 17): the contract's values,
the generation loop and the serving scheduler on the toy test double, and the manifest's checks.

The loop is checked against the logits the graph actually returned (a recorder around the backend): each steered
row's token is the argmax of those logits with the bonus on the end tokens, each gate-0 row's is the plain argmax,
and gate-0 rows are token for token what they are without any rule."""

from __future__ import annotations

import numpy as np
import pytest

from aligner_runtime.contract import EndRule
from aligner_runtime.generate import GenerationRun, SamplingConfig
from aligner_runtime.serving.scheduler import Scheduler
from runtime_fakes import VOCAB, ToyModel
from test_runtime_loop import PROMPTS, Recorder, mixed_gate_model

EOS = 39


def generate(backend, rule: EndRule, max_new_tokens=12, stops=(EOS,)):
    run = GenerationRun(backend, PROMPTS, SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=stops)
                        .validate(VOCAB), pad_token_id=0, two_pass=True, end_rule=rule, end_token_ids=(EOS,),
                        compact=False)
    return run, run.run()


def test_bonus_values_match_the_c_runtime():
    rule = EndRule(after=8, slope=0.7)
    assert [rule.bonus(n) for n in (0, 8)] == [0.0, 0.0]
    # the values tests/cpp/test_runtime_helpers.cpp pins for endBonus(8, 0.7, n)
    assert rule.bonus(9) == float(np.float32(0.7)) and rule.bonus(20) == float(np.float32(0.7) * np.float32(12))
    assert EndRule().bonus(100) == 0.0 and not EndRule().active


@pytest.mark.parametrize("kwargs", [dict(after=-1, slope=1.0), dict(after=3, slope=0.0), dict(after=3, slope=-2.0),
                                    dict(after=True, slope=1.0), dict(after=2.5, slope=1.0),
                                    dict(after=5000, slope=1.0), dict(after=3, slope=float("nan")),
                                    dict(after=3, slope=101.0)])
def test_bad_rules_are_refused(kwargs):
    with pytest.raises(ValueError):
        EndRule(**kwargs)


def test_apply_leaves_a_gate_zero_row_alone():
    logits = np.arange(VOCAB, dtype=np.float32)
    rule = EndRule(after=0, slope=5.0)
    assert rule.apply(logits, 4, 0.0, (EOS,)) is logits
    assert rule.apply(logits, 4, float("nan"), (EOS,)) is logits
    out = rule.apply(logits, 4, 1.0, (EOS, 3))
    assert out[EOS] == logits[EOS] + 20 and out[3] == logits[3] + 20 and out[5] == logits[5]
    assert logits[EOS] == EOS  # the input is not changed in place


def test_tokens_follow_the_returned_logits_with_the_bonus():
    recorder = Recorder(mixed_gate_model())
    rule = EndRule(after=2, slope=0.8)
    run, results = generate(recorder, rule)
    gates = [r.gate for r in results]
    assert 0.0 in gates and 1.0 in gates, gates
    decode = recorder.outputs[run.timing.prefill_passes:]
    for b, result in enumerate(results):
        for n, token in enumerate(result.token_ids[1:], start=1):
            logits = decode[n - 1]["logits"][b, -1].astype(np.float32).copy()
            if result.gate == 1.0 and n > rule.after:
                logits[EOS] += np.float32(rule.slope * (n - rule.after))
            assert token == int(np.argmax(logits)), (b, n)


def test_gate_zero_rows_are_unchanged_and_steered_rows_end():
    model = mixed_gate_model()
    _, plain = generate(model, EndRule())
    _, ruled = generate(model, EndRule(after=2, slope=100.0))
    for b, (off, on) in enumerate(zip(plain, ruled)):
        if on.gate == 0.0:
            assert on.token_ids == off.token_ids and on.finish_reason == off.finish_reason, b
        else:
            # a bonus far above the toy's logits ends the answer at the first token past 'after'
            assert on.token_ids == off.token_ids[:3] + [EOS] and on.finish_reason == "stop", b
    assert any(r.gate == 1.0 for r in ruled) and any(r.gate == 0.0 for r in ruled)


def test_the_scheduler_applies_the_same_rule():
    model = mixed_gate_model()
    rule = EndRule(after=3, slope=1.5)
    _, expected = generate(model, rule, max_new_tokens=14)
    config = SamplingConfig(max_new_tokens=14, stop_token_ids=(EOS,))
    with Scheduler(model, pad_token_id=0, two_pass=True, end_rule=rule, end_token_ids=(EOS,)) as scheduler:
        handles = [scheduler.submit(p, config) for p in PROMPTS]
        for handle in handles:
            assert handle.wait(60)
    for b, (handle, want) in enumerate(zip(handles, expected)):
        assert handle.token_ids == want.token_ids, b
        assert handle.gate == want.gate


def test_an_end_token_out_of_range_is_refused():
    from aligner_runtime.errors import AlignerError

    with pytest.raises(AlignerError, match="end token"):
        GenerationRun(ToyModel(), PROMPTS, SamplingConfig(), pad_token_id=0, two_pass=True,
                      end_rule=EndRule(after=1, slope=1.0), end_token_ids=(VOCAB,))


# --- a real export on ONNX Runtime against the PyTorch reference ------------------------------------------------------
def test_export_with_end_rule_matches_reference(tmp_path_factory, tiny_model_dir):
    """The rule written by ``export --end-after --end-slope`` reaches the manifest and the graph metadata, and the
    ORT generation loop equals the hooked HF model with the reference's end-rule processor, mixed gates in a batch."""
    import json

    import onnx

    from aligner_runtime.api import Aligner
    from aligner_export.hf.modeling import chat_texts, load_model, tokenize_batch
    from aligner_export.hf.reference import reference_generate
    from runtime_exports import END_RULE_OPTIONS, steer_config, tiny_export
    from test_runtime_export import mixed_prompts

    export_dir, model_dir, pack = tiny_export(tmp_path_factory, tiny_model_dir, "llama", END_RULE_OPTIONS)
    manifest = json.loads((export_dir / "inferaligner.json").read_text())
    assert manifest["end_rule"] == {"after": 2, "slope": 3.0}
    meta = {p.key: p.value for p in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta["inferaligner.end_rule"]) == manifest["end_rule"]
    aligner = Aligner.load(export_dir)
    prompts = mixed_prompts(aligner)
    results = aligner.generate(prompts, max_new_tokens=12, batch_size=len(prompts))
    model, tokenizer = load_model(model_dir)
    batch = tokenize_batch(tokenizer, chat_texts(tokenizer, prompts)[0], "left")
    sequences, gate, _ = reference_generate(model, steer_config(export_dir, pack), batch["input_ids"],
                                            batch["attention_mask"], max_new_tokens=12,
                                            end_rule=manifest["end_rule"], eos_token_ids=manifest["eos_token_ids"])
    eos = set(manifest["eos_token_ids"])
    for b, result in enumerate(results):
        row = sequences[b, batch["input_ids"].shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert result.gate == gate[b].item()
        assert result.token_ids == row[:end], (b, result.gate)
    # with a slope of 3 per token the steered rows of a random model end well before the budget
    assert all(r.finish_reason == "stop" for r in results if r.gate == 1.0)
