"""Continuous batching (``aligner_runtime.serving.scheduler``): requests joining and leaving a running batch, with mixed
gates, give what each request gives when it runs alone. Against the toy model's no-cache oracle
(``tests/runtime_fakes.py``) and against :meth:`Aligner.generate` on tiny real exports of both gate kinds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aligner_runtime.errors import AlignerError
from aligner_runtime.generate import GenerationRun, SamplingConfig
from aligner_runtime.serving.scheduler import QueueFull, Scheduler
from runtime_fakes import VOCAB, ToyModel, reference_greedy

TOY_PROMPTS = [[3, 7, 1, 9, 4], [12, 5], [8, 8, 30, 2, 17, 21, 6], [33, 1, 14], [25, 19, 11, 2]]


class Hooked:
    """Wraps a backend: runs ``actions[n]`` (on the scheduler thread) just before the ``n``-th forward call, which
    makes a request join at an exact step boundary, and records every call's past length and batch."""

    def __init__(self, backend, actions=None):
        self.backend = backend
        self.actions = dict(actions or {})
        self.calls: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        n = len(self.calls) + 1
        if n in self.actions:
            self.actions.pop(n)()
        # the past length, whether the past comes as arrays or in the backend's own (bound) cache
        self.calls.append((feeds["input_ids"].shape[0], feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1]))
        return self.backend._run(feeds)


def toy_model() -> ToyModel:
    """The toy model with its gate threshold at the median prompt score: the prompts mix gates."""
    model = ToyModel()
    scores = sorted(reference_greedy(model, p, 1)[2] for p in TOY_PROMPTS)
    model.bias = np.float32(-(scores[1] + scores[2]) / 2)
    return model


def toy_scheduler(backend, **options) -> Scheduler:
    return Scheduler(backend, pad_token_id=0, two_pass=True, **options)


def finished(handles, timeout=60):
    for handle in handles:
        assert handle.wait(timeout), f"request {handle.id} did not finish"
    return handles


# --- the toy model: exact bookkeeping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prefill", ["alone", "together"])
def test_rows_joining_and_leaving_mid_batch_match_the_oracle(prefill, padding_side):
    model = toy_model()
    model.padding_side = padding_side  # right: what the ORT backend says of a GroupQueryAttention graph
    budgets = [10, 6, 9, 4, 12]
    handles = {}

    def submit(i):
        handles[i] = scheduler.submit(TOY_PROMPTS[i], SamplingConfig(max_new_tokens=budgets[i]))

    # 0 and 1 start; 2 and 3 join before the 3rd forward call, 4 before the 8th (after 1 has left).
    hooked = Hooked(model, {3: lambda: (submit(2), submit(3)), 8: lambda: submit(4)})
    with toy_scheduler(hooked, max_batch_size=3, prefill=prefill) as scheduler:
        submit(0), submit(1)
        while len(handles) < 5 or not all(h.done for h in handles.values()):
            time.sleep(0.01)
        gates = set()
        for i, handle in handles.items():
            tokens, gate, score, _ = reference_greedy(model, TOY_PROMPTS[i], budgets[i])
            assert handle.token_ids == tokens, i
            assert handle.gate == gate and handle.score == pytest.approx(score, abs=1e-5)
            assert handle.finish_reason == "length" and handle.error is None
            gates.add(gate)
        assert gates == {0.0, 1.0}
        assert max(batch for batch, _ in hooked.calls) == 3  # the batch really ran with 3 rows
        assert scheduler.stats()["active"] == 0


def test_sampled_rows_in_a_batch_equal_sampled_runs_alone():
    """Seeded sampling makes every token depend on the logits: a wrong mask, position or past would show."""
    model = toy_model()
    config = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=3.0, seed=11)
    alone = [GenerationRun(model, [p], config, pad_token_id=0, two_pass=True).run()[0] for p in TOY_PROMPTS]
    handles = []
    hooked = Hooked(model, {2: lambda: handles.append(scheduler.submit(TOY_PROMPTS[3], config)),
                            5: lambda: handles.append(scheduler.submit(TOY_PROMPTS[4], config))})
    with toy_scheduler(hooked, max_batch_size=8) as scheduler:
        handles += [scheduler.submit(p, config) for p in TOY_PROMPTS[:3]]
        while len(handles) < 5 or not all(h.done for h in handles):
            time.sleep(0.01)
    by_prompt = {tuple(h.prompt_ids): h for h in handles}
    for prompt, expected in zip(TOY_PROMPTS, alone):
        assert by_prompt[tuple(prompt)].token_ids == expected.token_ids
        assert by_prompt[tuple(prompt)].gate == expected.gate


def test_past_is_trimmed_to_the_longest_live_row():
    model = toy_model()
    hooked = Hooked(model)
    with toy_scheduler(hooked, max_batch_size=4) as scheduler:
        long = scheduler.submit([1] * 30, SamplingConfig(max_new_tokens=2))
        short = scheduler.submit([2, 3], SamplingConfig(max_new_tokens=10))
        finished([long, short])
    # Once the 30-token row has left, the short row decodes over its own past only.
    decode_pasts = [past for batch, past in hooked.calls if batch == 1 and past > 0]
    assert decode_pasts[-1] == 2 + 10 - 2  # the prompt and all but the last two tokens (fed, then picked)


class GateRecorder:
    """Records ``steer_gate_in`` of every decode step (rows in batch order: the first submitted comes first)."""

    def __init__(self, backend):
        self.backend = backend
        self.decode_gates = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        if feeds["input_ids"].shape[1] == 1:
            self.decode_gates.append(feeds["steer_gate_in"].copy())
        return self.backend._run(feeds)


def test_strength_schedule_counts_each_rows_own_decode_steps():
    model = toy_model()
    recorder = GateRecorder(model)
    fired = [p for p in TOY_PROMPTS if reference_greedy(model, p, 1)[1] == 1.0][:2]
    handles = []
    join = {4: lambda: handles.append(scheduler.submit(fired[1], SamplingConfig(max_new_tokens=4)))}
    hooked = Hooked(recorder, join)
    with toy_scheduler(hooked, strength=lambda step: 0.5 ** step) as scheduler:
        handles.append(scheduler.submit(fired[0], SamplingConfig(max_new_tokens=8)))
        while len(handles) < 2 or not all(h.done for h in handles):
            time.sleep(0.01)
    # The first row decodes steps 1, 2, ...; the joiner starts again at step 1 whatever the batch's age.
    first_row = [float(g[0]) for g in recorder.decode_gates]
    assert first_row == [0.5 ** t for t in range(1, 8)]
    joiner = [float(g[1]) for g in recorder.decode_gates if g.size == 2]
    assert joiner == [0.5 ** t for t in range(1, len(joiner) + 1)] and len(joiner) == 3


def test_stop_token_ends_one_row_and_the_others_continue():
    model = toy_model()
    first = reference_greedy(model, TOY_PROMPTS[2], 3)[0]
    stop = first[1]
    with toy_scheduler(model) as scheduler:
        a = scheduler.submit(TOY_PROMPTS[2], SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,)))
        b = scheduler.submit(TOY_PROMPTS[0], SamplingConfig(max_new_tokens=8))
        finished([a, b])
    assert a.finish_reason == "stop" and a.token_ids[-1] == stop
    assert b.token_ids == reference_greedy(model, TOY_PROMPTS[0], 8)[0] and b.finish_reason == "length"


def test_context_caps_the_budget_and_long_prompts_are_refused():
    with Scheduler(toy_model(), pad_token_id=0, two_pass=True, context_length=8) as scheduler:
        handle = scheduler.submit(TOY_PROMPTS[0], SamplingConfig(max_new_tokens=50))
        finished([handle])
        assert len(handle.token_ids) == 3 and handle.finish_reason == "length"
        with pytest.raises(AlignerError, match="context"):
            scheduler.submit(list(range(1, 9)), SamplingConfig())


@pytest.mark.parametrize("prompt, config, match", [
    ([], SamplingConfig(), "empty prompt"),
    ([1, VOCAB], SamplingConfig(), "out of range"),
    ([1, 2], SamplingConfig(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingConfig(top_p=1.5), "top_p"),
    ([1, 2], SamplingConfig(stop_token_ids=(-1,)), "stop token"),
])
def test_bad_requests_are_refused_in_the_caller_and_the_scheduler_goes_on(prompt, config, match):
    model = toy_model()
    with toy_scheduler(model) as scheduler:
        with pytest.raises(AlignerError, match=match):
            scheduler.submit(prompt, config)
        handle = scheduler.submit(TOY_PROMPTS[1], SamplingConfig(max_new_tokens=3))
        finished([handle])
        assert handle.token_ids == reference_greedy(model, TOY_PROMPTS[1], 3)[0]


class Blocking:
    """A backend whose forward calls wait until the test opens the gate, then take ``delay`` seconds each."""

    def __init__(self, backend, delay: float = 0.0):
        self.backend = backend
        self.delay = delay
        self.open = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        self.entered.set()
        assert self.open.wait(30)
        time.sleep(self.delay)
        return self.backend._run(feeds)


def test_full_queue_is_refused_with_a_retry_time():
    backend = Blocking(toy_model())
    with toy_scheduler(backend, max_batch_size=1, max_queue=1) as scheduler:
        try:
            running = scheduler.submit(TOY_PROMPTS[0], SamplingConfig(max_new_tokens=2))
            assert backend.entered.wait(10)  # the first request is in its prefill: the batch is full
            waiting = scheduler.submit(TOY_PROMPTS[1], SamplingConfig(max_new_tokens=2))
            with pytest.raises(QueueFull) as refused:
                scheduler.submit(TOY_PROMPTS[2], SamplingConfig(max_new_tokens=2))
            assert refused.value.retry_after >= 1
        finally:
            backend.open.set()
        finished([running, waiting])
        assert scheduler.stats()["rejected"] == 1


def test_cancel_and_timeout_end_only_their_request():
    model = toy_model()
    backend = Blocking(model, delay=0.01)
    with toy_scheduler(backend) as scheduler:
        cancelled = scheduler.submit(TOY_PROMPTS[0], SamplingConfig(max_new_tokens=40))
        kept = scheduler.submit(TOY_PROMPTS[1], SamplingConfig(max_new_tokens=6))
        timed = scheduler.submit(TOY_PROMPTS[2], SamplingConfig(max_new_tokens=40), timeout=0.2)
        queued = scheduler.submit(TOY_PROMPTS[3], SamplingConfig(max_new_tokens=40))
        queued.cancel()  # still waiting (the scheduler is blocked in the first prefill): leaves the queue now
        assert queued.done and queued.finish_reason == "cancelled" and queued.token_ids == []
        time.sleep(0.3)
        backend.open.set()
        while len(cancelled.token_ids) < 2:
            time.sleep(0.005)
        cancelled.cancel()
        finished([cancelled, kept, timed])
    assert cancelled.finish_reason == "cancelled" and 2 <= len(cancelled.token_ids) < 40
    assert timed.finish_reason == "timeout" and timed.token_ids == []
    assert kept.finish_reason == "length" and kept.token_ids == reference_greedy(model, TOY_PROMPTS[1], 6)[0]


class FailingOnce:
    """Raises on the first decode step that runs two rows."""

    def __init__(self, backend):
        self.backend = backend
        self.failed = False

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _run(self, feeds):
        if not self.failed and feeds["input_ids"].shape == (2, 1):
            self.failed = True
            raise RuntimeError("device lost")
        return self.backend._run(feeds)


def test_a_failing_step_fails_its_rows_and_the_scheduler_goes_on():
    model = toy_model()
    with toy_scheduler(FailingOnce(model)) as scheduler:
        first = [scheduler.submit(p, SamplingConfig(max_new_tokens=6)) for p in TOY_PROMPTS[:2]]
        finished(first)
        assert all(h.error and "device lost" in h.error for h in first)
        later = scheduler.submit(TOY_PROMPTS[1], SamplingConfig(max_new_tokens=4))
        finished([later])
        assert later.error is None and later.token_ids == reference_greedy(model, TOY_PROMPTS[1], 4)[0]
        assert scheduler.stats()["failed"] == 2 and scheduler.alive


def test_events_come_in_order_and_the_closed_scheduler_refuses():
    scheduler = toy_scheduler(toy_model())
    handle = scheduler.submit(TOY_PROMPTS[0], SamplingConfig(max_new_tokens=3))
    kinds = [event.kind for event in handle.events(timeout=30)]
    assert kinds == ["gate", "token", "token", "token", "done"]
    scheduler.close()
    with pytest.raises(Exception, match="closed"):
        scheduler.submit(TOY_PROMPTS[0], SamplingConfig())


def test_an_unsteered_graph_is_refused():
    with pytest.raises(AlignerError, match="steered export"):
        Scheduler(ToyModel(steered=False), pad_token_id=0, two_pass=False)


# --- tiny real exports: the scheduler against Aligner.generate alone --------------------------------------------------
@pytest.fixture(scope="module", params=["paper-gate", "linear-gate"])
def aligner_and_prompts(request, tmp_path_factory, tiny_model_dir):
    from aligner_runtime.api import Aligner
    from runtime_exports import DEFAULT_OPTIONS, LINEAR_OPTIONS, tiny_export
    from test_runtime_export import mixed_prompts

    options = DEFAULT_OPTIONS if request.param == "paper-gate" else LINEAR_OPTIONS
    aligner = Aligner.load(tiny_export(tmp_path_factory, tiny_model_dir, "llama", options)[0], threads=1)
    return aligner, mixed_prompts(aligner, 3)


def sampling(aligner, **options) -> SamplingConfig:
    return SamplingConfig(stop_token_ids=aligner.stop_token_ids, **options).validate(aligner.tokenizer.vocab_size)


@pytest.mark.parametrize("prefill", ["alone", "together"])
def test_greedy_outputs_equal_generate_alone_with_mixed_gates_joining_mid_batch(aligner_and_prompts, prefill):
    aligner, prompts = aligner_and_prompts
    budgets = [12, 5, 9, 16, 7, 11]
    expected = [aligner.generate(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    assert {r.gate for r in expected} == {0.0, 1.0}
    ids = [aligner.tokenizer.encode_prompt(p) for p in prompts]
    handles = {}

    def submit(i):
        handles[i] = scheduler.submit(ids[i], sampling(aligner, max_new_tokens=budgets[i]))

    # Two start; two join at the 4th forward call, two more at the 11th, while the first ones are still running.
    hooked = Hooked(aligner._backend, {4: lambda: (submit(2), submit(3)), 11: lambda: (submit(4), submit(5))})
    with Scheduler(hooked, pad_token_id=aligner.tokenizer.pad_token_id, two_pass=aligner.export.two_pass,
                   context_length=aligner.context_length, prefill=prefill) as scheduler:
        submit(0), submit(1)
        while len(handles) < 6 or not all(h.done for h in handles.values()):
            time.sleep(0.01)
    assert max(batch for batch, _ in hooked.calls) >= 3
    for i, result in enumerate(expected):
        handle = handles[i]
        assert handle.token_ids == result.token_ids, (i, prompts[i])
        assert handle.gate == result.gate
        assert handle.score == pytest.approx(result.score, abs=1e-4)
        assert handle.finish_reason == result.finish_reason


def test_concurrent_clients_get_what_they_get_alone(aligner_and_prompts):
    aligner, prompts = aligner_and_prompts
    expected = [aligner.generate(p, max_new_tokens=8).token_ids for p in prompts]
    got, errors = {}, []
    with Scheduler.for_aligner(aligner, max_batch_size=4) as scheduler:
        def client(i):
            try:
                for _ in range(2):
                    handle = scheduler.submit(aligner.tokenizer.encode_prompt(prompts[i]),
                                              sampling(aligner, max_new_tokens=8))
                    assert handle.wait(120)
                    got[i] = handle.token_ids
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert [got[i] for i in range(len(prompts))] == expected
