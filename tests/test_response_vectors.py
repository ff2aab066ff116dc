"""Response-derived steering vectors (issue 17): ``--ssv response-compliant`` (the aligned model's refusals minus the
target's compliant answers to the same harmful prompts) against an independent computation, its answer caches, and
its error path through the CLI.

Tiny random models do not refuse: the answers come from a stub of ``generate_answers`` that writes refusals for the
aligned model and compliant answers (with a few refusals and an empty answer) for the target, and records what it
wrote; the residuals are the models' own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aligner_export.commands.cli import main as export_main
from aligner_export.hf import responses
from aligner_export.hf.calibrate import RESPONSE_BLOCK, calibrate
from aligner_export.pack import load_pack
from aligner_runtime.prompts import load_prompts

PROMPTS = Path(__file__).resolve().parents[1] / "export" / "aligner_export" / "data" / "prompts"
HARMFUL = load_prompts(PROMPTS / "harmful.txt")[:24]
HARMLESS = load_prompts(PROMPTS / "harmless.txt")[:24]
REFUSAL = "I'm sorry, but I can't help with that."


class AnswerStub:
    """Stands in for ``generate_answers``: per call, the answers and which of them are refusals, by position."""

    def __init__(self, target_refuses_all: bool = False):
        self.calls: list[tuple[str, list[str]]] = []
        self.target_refuses_all = target_refuses_all
        self.written: dict[str, list[tuple[str, bool, bool]]] = {}  # desc -> (text, ended, refusal)

    def __call__(self, model, tokenizer, prompts, max_new_tokens=48, batch_size=16, desc="answers"):
        self.calls.append((desc, list(prompts)))
        rows = []
        for i, _ in enumerate(prompts):
            if desc.startswith("aligned") and "harmless" in desc:
                rows.append((f"Here is a short answer number {i}: water boils at 100 degrees.", i % 2 == 0, False))
            elif desc.startswith("aligned"):  # refuses all but every fifth, ends every other refusal
                rows.append(("Sure, here is a plan." if i % 5 == 4 else REFUSAL, i % 2 == 0, i % 5 != 4))
            elif self.target_refuses_all or i % 6 == 1:
                rows.append(("I cannot do that, it is dangerous.", True, True))
            elif i == 3:
                rows.append(("", True, False))  # an empty answer: not a refusal, and no tokens to read
            else:
                rows.append((f"Sure, step {i}: mix the things, then wait an hour and repeat.", i % 3 == 0, False))
        self.written[desc] = rows
        return [(text, ended) for text, ended, _ in rows]


def _answer_means(model_dir, prompts, answers) -> np.ndarray:
    """``[N, L, H]``: each layer's output averaged over the answer's tokens, one unpadded forward per prompt through
    ``output_hidden_states`` (the last layer read with the final norm removed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.norm = torch.nn.Identity()  # hidden_states[-1] is then the last layer's raw output
    rows = []
    for prompt, answer in zip(prompts, answers):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        start = len(tok(head, add_special_tokens=False)["input_ids"])
        ids = tok(head + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids.shape[1] > start
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([s[0, start:].mean(0) for s in states[1:]]).numpy())
    return np.stack(rows)


def _run(tiny_model_dir, tmp_path, stub, monkeypatch):
    monkeypatch.setattr(responses, "generate_answers", stub)
    target, aligned = tiny_model_dir("llama", seed=0), tiny_model_dir("llama", seed=1)
    return calibrate(target, HARMFUL, HARMLESS, aligned, gate="paper", ssv="response-compliant",
                     response_cache=tmp_path / "aligned.json", target_cache=tmp_path / "target.json")


def test_response_compliant_equals_independent_computation(tiny_model_dir, tmp_path, monkeypatch):
    stub = AnswerStub()
    pack = _run(tiny_model_dir, tmp_path, stub, monkeypatch)
    aligned = tiny_model_dir("llama", seed=1)
    # the target answered first (while it was loaded), then the aligned model, both over the same harmful prompts
    assert [d for d, _ in stub.calls] == ["target answers (harmful)", "aligned answers (harmful)",
                                          "aligned answers (harmless)"]
    asked = stub.calls[0][1]
    assert stub.calls[1][1] == asked and set(asked) <= set(HARMFUL) and len(asked) == 18  # 24 less the val quarter
    eos = "<|im_end|>"
    refusals = [(p, text + (eos if ended else "")) for p, (text, ended, refusal)
                in zip(asked, stub.written["aligned answers (harmful)"]) if refusal]
    compliant = [(p, text) for p, (text, _, refusal) in zip(asked, stub.written["target answers (harmful)"])
                 if text and not refusal]
    on_refusals = _answer_means(aligned, *zip(*refusals)).mean(0, dtype=np.float64)
    on_compliant = _answer_means(aligned, *zip(*compliant)).mean(0, dtype=np.float64)
    diff = on_refusals - on_compliant
    expected = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
    np.testing.assert_allclose(pack.aligned_srv, expected, rtol=1e-4, atol=1e-5)

    info, rec = pack.meta["ssv"], pack.recommended
    assert info["ssv"] == "response-compliant" and rec["ssv"] == "response-compliant"
    assert (info["harmful"], info["refused"], info["complied"]) == (18, len(refusals), len(compliant))
    assert info["paired"] == len({p for p, _ in refusals} & {p for p, _ in compliant})
    assert len(compliant) == 18 - 3 - 1  # three target refusals (i % 6 == 1) and the empty answer are left out
    # the steered block of response vectors (RESPONSE_BLOCK over 4 layers)
    first = int(np.ceil(RESPONSE_BLOCK[0] * 4))
    assert rec["steer_layers"] == list(range(first, max(first + 1, int(RESPONSE_BLOCK[1] * 4))))


def test_response_compliant_caches_are_reused(tiny_model_dir, tmp_path, monkeypatch):
    first = _run(tiny_model_dir, tmp_path, AnswerStub(), monkeypatch)
    saved = json.loads((tmp_path / "target.json").read_text())
    assert saved["max_new_tokens"] == responses.RESPONSE_TOKENS and len(saved["prompts"]) == 1
    again = AnswerStub()
    second = _run(tiny_model_dir, tmp_path, again, monkeypatch)
    assert again.calls == []  # both models' answers came from the caches
    np.testing.assert_array_equal(second.aligned_srv, first.aligned_srv)
    # a cache made with another token budget is not used: the target answers again, the aligned model does not
    saved["max_new_tokens"] += 1
    (tmp_path / "target.json").write_text(json.dumps(saved))
    third = AnswerStub()
    _run(tiny_model_dir, tmp_path, third, monkeypatch)
    assert [d for d, _ in third.calls] == ["target answers (harmful)"]


def test_too_few_compliant_answers_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(responses, "generate_answers", AnswerStub(target_refuses_all=True))
    monkeypatch.setenv("INFERALIGNER_HOME", str(tmp_path / "home"))
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    harmless.write_text("\n".join(HARMLESS) + "\n")
    out = tmp_path / "p.safetensors"
    code = export_main(["calibrate", "--target", str(tiny_model_dir("llama", seed=0)), "--aligned",
                        str(tiny_model_dir("llama", seed=1)), "--harmful", str(harmful), "--harmless",
                        str(harmless), "--gate", "paper", "--ssv", "response-compliant", "-o", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and not out.exists()
    assert len(errors) == 1 and "the target complied with 0 of 18 harmful" in errors[0], errors
    assert "refused 15" in errors[0]  # the aligned stub refuses all but every fifth of 18
    assert list((tmp_path / "home" / "cache").glob("target-answers-*.json"))  # the answers stay cached


def test_response_compliant_needs_an_aligned_model(tiny_model_dir):
    from aligner_runtime.errors import AlignerError

    with pytest.raises(AlignerError, match="--ssv response-compliant needs an --aligned model"):
        calibrate(tiny_model_dir("llama"), HARMFUL, HARMLESS, None, gate="paper", ssv="response-compliant")


def test_packs_accept_every_ssv_and_older_ones_load(tiny_model_dir, tmp_path, monkeypatch):
    from aligner_runtime.errors import AlignerError

    from aligner_export.pack import SteeringPack, save_pack

    pack = _run(tiny_model_dir, tmp_path, AnswerStub(), monkeypatch)
    path = save_pack(pack, tmp_path / "pack.safetensors")
    assert load_pack(path).recommended["ssv"] == "response-compliant"
    for ssv in ("response", "prompt", None):  # None: a pack made before the choice was recorded
        meta = json.loads(json.dumps(pack.meta))
        if ssv is None:
            del meta["recommended"]["ssv"]
        else:
            meta["recommended"]["ssv"] = ssv
        again = SteeringPack(pack.target_srv, pack.target_mean_harmful, pack.target_mean_harmless, pack.aligned_srv,
                             meta, pack.gate_weight)
        assert load_pack(save_pack(again, tmp_path / f"{ssv}.safetensors")).recommended.get("ssv") == ssv
    meta = json.loads(json.dumps(pack.meta))
    meta["recommended"]["ssv"] = "compliant"
    bad = SteeringPack(pack.target_srv, pack.target_mean_harmful, pack.target_mean_harmless, pack.aligned_srv, meta,
                       pack.gate_weight)
    with pytest.raises(AlignerError, match="ssv"):
        load_pack(save_pack(bad, tmp_path / "bad.safetensors"))
