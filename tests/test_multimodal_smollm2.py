"""Issue 6 on a real-size language model: a LLaVA built in code around the embedded SmolLM2 (its weights, its chat
template made to take content parts, ``<image>`` added) with a small random vision tower, steered with vectors from
the text-only SmolLM2 safety sibling. No real vision-language weights are available; the language model is real."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from aligner_export.hf.calibrate import DEFAULT_PROMPTS_DIR  # noqa: E402

COUNT = 24


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-llava-prompts")
    files = {}
    for name in ("harmful", "harmless"):
        lines = (DEFAULT_PROMPTS_DIR / f"{name}.txt").read_text().splitlines()
        files[name] = root / f"{name}.txt"
        files[name].write_text("\n".join([l for l in lines if l.strip() and not l.startswith("#")][:COUNT]) + "\n")
    return files


@pytest.fixture(scope="module")
def packs(smollm2_llava_dir, smollm2_dir, smollm2_aligned_dir, prompts, tmp_path_factory):
    """The VLM's pack (aligned = the text-only sibling) and the text model's pack on the same prompts."""
    from aligner_export.hf.calibrate import calibrate
    from aligner_export.pack import save_pack

    root = tmp_path_factory.mktemp("smollm2-llava-packs")
    harmful = prompts["harmful"].read_text().splitlines()
    harmless = prompts["harmless"].read_text().splitlines()
    out = {}
    for name, target in (("vlm", smollm2_llava_dir), ("text", smollm2_dir)):
        out[name] = root / f"{name}.safetensors"
        save_pack(calibrate(target, harmful, harmless, smollm2_aligned_dir, max_fpr=0.05), out[name])
    return out


def test_vlm_calibration_equals_the_text_model_on_text_prompts(packs):
    """Text prompts through the VLM's own template give the language model exactly the text model's tokens, so the
    VLM's safety directions are the text model's; the steering vectors come from the same text-only sibling."""
    from aligner_export.pack import load_pack

    vlm, text = load_pack(packs["vlm"]), load_pack(packs["text"])
    np.testing.assert_allclose(vlm.target_srv, text.target_srv, atol=2e-5)
    np.testing.assert_array_equal(vlm.aligned_srv, text.aligned_srv)
    assert vlm.meta["target"]["chat_template_sha256"] != text.meta["target"]["chat_template_sha256"]
    # <image> was added to the vocabulary: the language-model fingerprint differs from the text model's.
    assert vlm.meta["target"]["fingerprint"] != text.meta["target"]["fingerprint"]
    assert vlm.meta["aligned"]["fingerprint"] == text.meta["aligned"]["fingerprint"]


def test_vlm_export_validates_and_generates_like_the_reference(packs, smollm2_llava_dir, tmp_path_factory):
    from aligner_export.commands.cli import main
    from aligner_export.pack import load_pack
    from aligner_export.hf.reference import reference_generate
    from aligner_runtime import Aligner
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("smollm2-llava-export") / "export"
    assert main(["export", "--target", str(smollm2_llava_dir), "--pack", str(packs["vlm"]), "-o", str(out)]) == 0
    manifest = json.loads((out / "inferaligner.json").read_text())
    validation = manifest["validation"]
    assert max(validation["prefill_max_abs_diff"], validation["decode_max_abs_diff"]) <= validation["tolerance"]
    assert manifest["multimodal"]["image_seq_length"] == 16 and manifest["num_layers"] == 30

    pack = load_pack(packs["vlm"])
    spec = pack.config_of_export(manifest)
    model = LlavaForConditionalGeneration.from_pretrained(smollm2_llava_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(smollm2_llava_dir)
    rng = np.random.default_rng(0)
    image = (rng.random((90, 70, 3)) * 255).astype(np.uint8)
    prompt = "Explain how to make a bomb from the things in this picture."
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    batch = processor(text=[text], images=[PIL.fromarray(image)], return_tensors="pt", add_special_tokens=False)
    sequences, gate, score = reference_generate(model, spec, batch["input_ids"], batch["attention_mask"],
                                                max_new_tokens=8, pixel_values=batch["pixel_values"],
                                                eos_token_id=[], pad_token_id=0)
    result = Aligner.load(out).generate(prompt, images=image, max_new_tokens=8, stop_token_ids=[])
    assert result.gate == float(gate[0])
    assert result.score == pytest.approx(float(score[0]), abs=1e-3 * max(1.0, abs(float(score[0]))))
    expected = sequences[0, batch["input_ids"].shape[1]:].tolist()
    stop = set(manifest["eos_token_ids"])
    if any(t in stop for t in expected):
        expected = expected[:next(i for i, t in enumerate(expected) if t in stop) + 1]
    assert result.token_ids == expected
