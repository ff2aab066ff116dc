"""The run-time's generation loop against an independent no-cache oracle, on the toy test double
(``tests/runtime_fakes.py``). Real exports are tested in ``test_runtime_export.py``."""

from __future__ import annotations

import numpy as np
import pytest

from aligner_runtime.errors import AlignerError
from aligner_runtime.generate import GenerationRun, SamplingConfig, filter_logits
from runtime_fakes import VOCAB, ToyModel, reference_greedy

PROMPTS = [[3, 7, 1, 9, 4], [12, 5], [8, 8, 30, 2, 17, 21, 6], [33, 1, 14], [25, 19, 11, 2]]


class Recorder:
    """Wraps a backend and keeps every call's outputs, to compare the decode-step logits."""

    def __init__(self, backend):
        self.backend = backend
        self.outputs = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        out = self.backend._run(feeds)
        self.outputs.append(out)
        return out


def mixed_gate_model(**kwargs) -> ToyModel:
    """A toy model whose bias puts the gate threshold at the median prompt score: the batch mixes gates."""
    model = ToyModel(**kwargs)
    scores = sorted(reference_greedy(model, p, 1)[2] for p in PROMPTS)
    model.bias = np.float32(-(scores[1] + scores[2]) / 2)
    model.calls.clear()
    return model


def run(model, prompts=PROMPTS, two_pass=True, context_length=None, **config):
    config.setdefault("max_new_tokens", 8)
    generation = GenerationRun(model, prompts, SamplingConfig(**config).validate(VOCAB), pad_token_id=0,
                               two_pass=two_pass, context_length=context_length)
    return generation, generation.run()


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_greedy_batch_with_mixed_gates_equals_oracle(with_position_ids):
    model = mixed_gate_model(with_position_ids=with_position_ids)
    _, results = run(model)
    gates = [r.gate for r in results]
    assert 0.0 in gates and 1.0 in gates, gates
    for prompt, result in zip(PROMPTS, results):
        tokens, gate, score, _ = reference_greedy(model, prompt, 8)
        assert result.token_ids == tokens
        assert result.gate == gate
        assert result.score == pytest.approx(score, abs=1e-5)
        assert result.prompt_tokens == len(prompt) and result.new_tokens == 8 and result.finish_reason == "length"


def test_decode_step_logits_are_steered_like_the_oracle():
    model = mixed_gate_model()
    recorder = Recorder(model)
    generation, results = run(recorder)
    decode_outputs = recorder.outputs[generation.timing.prefill_passes:]
    assert len(decode_outputs) == 7
    for b, prompt in enumerate(PROMPTS):
        _, _, _, step_logits = reference_greedy(model, prompt, 8)
        for step, out in enumerate(decode_outputs, start=1):
            np.testing.assert_allclose(out["logits"][b, -1], step_logits[step], rtol=1e-4, atol=1e-4)
            # §5 rule 3: the gate fed back keeps each row's prefill decision
            assert out["steer_gate"][b] == results[b].gate


def test_two_pass_prefill_only_for_fired_rows():
    model = mixed_gate_model()
    generation, results = run(model)
    fired = [b for b, r in enumerate(results) if r.gate == 1.0]
    assert generation.timing.prefill_passes == 2
    first, second = model.calls[0], model.calls[1]
    assert np.all(first["steer_gate_in"] == -1.0)
    assert second["input_ids"].shape[0] == len(fired)
    assert np.all(second["steer_gate_in"] == 1.0)
    np.testing.assert_array_equal(second["input_ids"], first["input_ids"][fired])
    for call in model.calls[2:]:
        assert call["input_ids"].shape[1] == 1


def test_without_the_second_pass_steered_rows_differ_from_the_oracle():
    # The toy model shifts layer 0 (below its gate layer 1): skipping rule 2 must show.
    model = mixed_gate_model()
    _, results = run(model, two_pass=False)
    fired = [b for b, r in enumerate(results) if r.gate == 1.0]
    mismatched = [b for b in fired if results[b].token_ids != reference_greedy(model, PROMPTS[b], 8)[0]]
    assert mismatched


def test_gate_override_zero_equals_unsteered_oracle():
    model = mixed_gate_model()
    generation = GenerationRun(model, PROMPTS, SamplingConfig(max_new_tokens=6), pad_token_id=0, two_pass=True,
                               _gate_override=0.0)
    results = generation.run()
    assert generation.timing.prefill_passes == 1
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == reference_greedy(model, prompt, 6, gate_off=True)[0]
        assert result.gate == 0.0


def test_stop_token_ends_one_row_and_the_others_continue():
    model = mixed_gate_model()
    reference = [reference_greedy(model, p, 8)[0] for p in PROMPTS]
    stop = reference[2][2]
    _, results = run(model, stop_token_ids=(stop,))
    for prompt, result in zip(PROMPTS, results):
        expected = reference_greedy(model, prompt, 8, stop=(stop,))[0]
        assert result.token_ids == expected
        assert result.finish_reason == ("stop" if expected[-1] == stop else "length")
    assert results[2].finish_reason == "stop" and len(results[2].token_ids) == reference[2].index(stop) + 1
    assert any(r.finish_reason == "length" for r in results)  # the batch shrank and the rest went on


def test_context_length_caps_new_tokens_and_rejects_long_prompts():
    model = ToyModel()
    _, results = run(model, prompts=[PROMPTS[2]], context_length=10, max_new_tokens=8)
    assert results[0].new_tokens == 3 and results[0].finish_reason == "length"
    with pytest.raises(AlignerError, match="context"):
        run(model, prompts=[PROMPTS[2]], context_length=7)


def test_unsteered_graph_reports_no_gate():
    model = ToyModel(steered=False)
    _, results = run(model)
    assert all(r.gate is None and r.score is None for r in results)
    assert results[0].token_ids == reference_greedy(model, PROMPTS[0], 8)[0]
    with pytest.raises(AlignerError, match="no steering interface"):
        GenerationRun(model, PROMPTS, SamplingConfig(), pad_token_id=0, two_pass=False, _gate_override=0.0)


def test_seeded_sampling_is_reproducible_and_independent_of_batchmates():
    model = ToyModel()
    sample = dict(do_sample=True, temperature=1.5, seed=123, max_new_tokens=12)
    _, a = run(model, **sample)
    _, b = run(model, **sample)
    _, alone = run(model, prompts=[PROMPTS[3]], **sample)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert alone[0].token_ids == a[3].token_ids
    _, other = run(model, **{**sample, "seed": 124})
    assert [r.token_ids for r in other] != [r.token_ids for r in a]
    _, top1 = run(model, **{**sample, "top_k": 1})
    _, greedy = run(model, max_new_tokens=12)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_filter_logits_top_k_and_top_p():
    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
    kept = np.isfinite(filter_logits(logits, SamplingConfig(top_p=0.6)))
    assert kept.tolist() == [True, True, False, False]
    kept = np.isfinite(filter_logits(logits, SamplingConfig(top_p=0.4)))
    assert kept.tolist() == [True, False, False, False]
    kept = np.isfinite(filter_logits(logits, SamplingConfig(top_k=3)))
    assert kept.tolist() == [True, True, True, False]


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(temperature=-1.0), dict(temperature=float("nan")),
    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-3), dict(stop_token_ids=(VOCAB,)),
])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(AlignerError, match="invalid sampling parameter|out of range"):
        SamplingConfig(**bad).validate(VOCAB)


@pytest.mark.parametrize("prompts,match", [([[1, VOCAB]], "out of range"), ([[1, -1]], "out of range"),
                                            ([[]], "empty prompt"), ([], "no prompts")])
def test_bad_prompt_ids(prompts, match):
    with pytest.raises(AlignerError, match=match):
        GenerationRun(ToyModel(), prompts, SamplingConfig(), pad_token_id=0, two_pass=True)


def test_without_compaction_shapes_stay_fixed_and_tokens_agree():
    model = mixed_gate_model()
    reference = [reference_greedy(model, p, 8)[0] for p in PROMPTS]
    stop = reference[2][2]
    compacted = GenerationRun(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)),
                              pad_token_id=0, two_pass=True).run()
    model.calls.clear()
    fixed = GenerationRun(model, PROMPTS, SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)), pad_token_id=0,
                          two_pass=True, compact=False).run()
    assert [r.token_ids for r in fixed] == [r.token_ids for r in compacted]
    assert [r.finish_reason for r in fixed] == [r.finish_reason for r in compacted]
    decode_calls = [c for c in model.calls if c["input_ids"].shape[1] == 1]
    assert decode_calls and all(c["input_ids"].shape[0] == len(PROMPTS) for c in decode_calls)


def test_prefill_in_row_groups_gives_the_same_result(monkeypatch):
    import aligner_runtime.generate as generate

    model = mixed_gate_model()
    whole = GenerationRun(model, PROMPTS, SamplingConfig(max_new_tokens=5), pad_token_id=0, two_pass=True).run()
    model.calls.clear()
    width = max(len(p) for p in PROMPTS)
    monkeypatch.setattr(generate, "PREFILL_LOGITS_BYTES", 2 * width * VOCAB * 4)  # two rows per group
    grouped = GenerationRun(model, PROMPTS, SamplingConfig(max_new_tokens=5), pad_token_id=0, two_pass=True).run()
    prefill_calls = [c for c in model.calls if c["input_ids"].shape[1] == width]
    assert max(c["input_ids"].shape[0] for c in prefill_calls) == 2 and len(prefill_calls) >= 3
    assert [(r.token_ids, r.gate) for r in grouped] == [(r.token_ids, r.gate) for r in whole]
    for a, b in zip(grouped, whole):
        assert a.score == pytest.approx(b.score, abs=1e-6)
