"""Torch-free image preprocessing (aligner_runtime.vision) against HF's slow CLIPImageProcessor (issue 6).

Images are made in the test (seeded noise over smooth gradients) in several sizes and modes, and passed as PIL
images, numpy arrays and PNG/JPEG files. The HF comparison is the reference; it skips when transformers is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from aligner_runtime.errors import AlignerError
from aligner_runtime.vision import load_image, preprocess
from aligner_runtime.vision_spec import ImageSpec

PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is absent: image preprocessing needs it")

from generated_images import make_image, make_pixels  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOL = 1e-5

TINY = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
# llava-hf/llava-1.5-7b-hf preprocessor_config.json
LLAVA15 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_processor_type": "CLIPImageProcessor",
    "image_std": CLIP_STD, "processor_class": "LlavaProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
EXACT = {"size": {"height": 24, "width": 40}, "do_center_crop": False, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# The crop is larger than the resized image: HF pads with zeros before rescale and normalize.
PADDED = {"size": {"shortest_edge": 24}, "crop_size": {"height": 31, "width": 41}, "resample": 1}
CONFIGS = {"tiny": TINY, "llava15": LLAVA15, "exact": EXACT, "padded": PADDED}

SIZES = {  # (height, width) per config: square, portrait, landscape, smaller than the target, odd
    "tiny": [(48, 48), (57, 31), (53, 32), (31, 75), (13, 21), (33, 101)],
    "llava15": [(336, 336), (480, 360), (300, 517), (120, 90), (337, 601)],
    "exact": [(48, 48), (57, 31), (31, 75), (13, 21), (33, 101)],
    "padded": [(48, 48), (57, 31), (53, 32), (31, 75), (13, 21)],
}
MODES = ["RGB", "RGBA", "L", "P"]


def hf_processor(config: dict):
    transformers = pytest.importorskip("transformers", reason="transformers is absent: no HF reference to compare")
    return transformers.CLIPImageProcessor(**config)


def hf_pixels(processor, images, **kwargs) -> np.ndarray:
    return np.asarray(processor(images=images, return_tensors="np", **kwargs)["pixel_values"])


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_pil_images_match_hf(name, mode):
    config = CONFIGS[name]
    processor = hf_processor(config)
    spec = ImageSpec.from_processor_config(config)
    images = [make_image(h, w, mode, seed=i) for i, (h, w) in enumerate(SIZES[name])]
    ours = preprocess(images, spec)
    theirs = hf_pixels(processor, images)
    assert ours.shape == (len(images), 3) + spec.output_size
    diff = max_diff(ours, theirs)
    print(f"{name} {mode}: max |ours - HF| = {diff:.3g}")
    assert diff <= TOL
    # Same steps in the same dtypes (float64 rescale, float32 normalize): measured bit-identical with
    # transformers 4.57 and Pillow 13; a float32 rescale would differ by about 2e-7 and pass the tolerance alone.
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["tiny", "llava15"])
def test_uint8_arrays_match_hf(name):
    config = CONFIGS[name]
    processor = hf_processor(config)
    spec = ImageSpec.from_processor_config(config)
    for i, (h, w) in enumerate(SIZES[name]):
        rgb = make_pixels(h, w, 3, seed=10 + i)
        assert max_diff(preprocess(rgb, spec), hf_pixels(processor, rgb)) <= TOL
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        assert max_diff(preprocess(chw, spec), hf_pixels(processor, chw)) <= TOL
        # HF takes RGBA and grayscale arrays only as PIL images; the array path must equal that.
        rgba = make_pixels(h, w, 4, seed=20 + i)
        assert max_diff(preprocess(rgba, spec), hf_pixels(processor, PIL_Image.fromarray(rgba))) <= TOL
        gray = make_pixels(h, w, 1, seed=30 + i)[:, :, 0]
        assert max_diff(preprocess(gray, spec), hf_pixels(processor, PIL_Image.fromarray(gray))) <= TOL


def test_float_arrays_match_hf():
    """A float array in [0, 1] is HF's input with do_rescale=False (HF warns and double-rescales otherwise)."""
    processor = hf_processor(TINY)
    spec = ImageSpec.from_processor_config(TINY)
    rng = np.random.default_rng(3)
    for h, w in SIZES["tiny"]:
        floats = rng.random((h, w, 3)).astype(np.float32)
        diff = max_diff(preprocess(floats, spec), hf_pixels(processor, floats, do_rescale=False))
        assert diff <= TOL
        # Integral floats in [0, 255] are taken as pixel values, as HF's to_pil_image takes them.
        integral = make_pixels(h, w, 3, seed=5).astype(np.float64)
        assert max_diff(preprocess(integral, spec), hf_pixels(processor, integral.astype(np.uint8))) <= TOL


@pytest.mark.parametrize("suffix, mode", [(".png", mode) for mode in MODES] + [(".jpg", "RGB"), (".jpg", "L")])
def test_image_files_match_hf(tmp_path, suffix, mode):
    processor = hf_processor(LLAVA15)
    spec = ImageSpec.from_processor_config(LLAVA15)
    paths = []
    for i, (h, w) in enumerate(SIZES["llava15"][1:4]):
        path = tmp_path / f"img{i}{suffix}"
        make_image(h, w, mode, seed=40 + i).save(path)
        paths.append(str(path))
    # HF opens a path with its own load_image (EXIF transpose, then RGB).
    diff = max_diff(preprocess(paths, spec), hf_pixels(processor, paths))
    print(f"llava15 {suffix} {mode}: max |ours - HF| = {diff:.3g}")
    assert diff <= TOL


def test_exif_orientation_applied_like_hf(tmp_path):
    processor = hf_processor(TINY)
    spec = ImageSpec.from_processor_config(TINY)
    image = make_image(40, 70, "RGB", seed=7)
    exif = PIL_Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (40, 70)  # (width, height) after the transpose
    assert max_diff(preprocess(path, spec), hf_pixels(processor, str(path))) <= TOL


def test_llava_processor_pixel_values_match(tmp_path):
    """What LlavaProcessor (and AutoProcessor on a saved LLaVA processor) hands the vision tower."""
    transformers = pytest.importorskip("transformers", reason="transformers is absent: no HF reference to compare")
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "describe": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    llava = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(**LLAVA15), tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default",
    )
    spec = ImageSpec.from_processor_config(llava.image_processor.to_dict())
    assert spec == ImageSpec.from_processor_config(LLAVA15)
    images = [make_image(h, w, "RGB", seed=50 + i) for i, (h, w) in enumerate(SIZES["llava15"][:3])]
    out = llava(images=images, text=["<image> describe"] * len(images), return_tensors="np")
    assert max_diff(preprocess(images, spec), np.asarray(out["pixel_values"])) <= TOL
    # From a saved directory, as an export reads it: the spec comes from preprocessor_config.json.
    llava.save_pretrained(tmp_path)
    reloaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    print(f"AutoProcessor image processor: {type(reloaded.image_processor).__name__}")
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert ImageSpec.from_processor_config(saved) == spec
    out = reloaded(images=images, text=["<image> describe"] * len(images), return_tensors="np")
    assert max_diff(preprocess(images, spec), np.asarray(out["pixel_values"])) <= TOL


def test_constant_image_by_hand():
    """Independent of HF: a constant image stays constant through resize/crop; each channel is (v/255 - m)/s."""
    spec = ImageSpec.from_processor_config(TINY)
    color = np.array([200, 17, 96], dtype=np.uint8)
    pixels = preprocess(np.broadcast_to(color, (50, 90, 3)).copy(), spec)
    expected = ((color.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    assert pixels.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(pixels[0], np.broadcast_to(expected[:, None, None], (3, 32, 32)), atol=1e-6)


def test_padding_by_hand():
    """Where the crop is larger than the image, the border is zero pixels: -mean/std after normalization."""
    spec = ImageSpec.from_processor_config({"size": {"height": 10, "width": 10}, "crop_size": 14,
                                            "image_mean": CLIP_MEAN, "image_std": CLIP_STD})
    pixels = preprocess(np.full((10, 10, 3), 255, dtype=np.uint8), spec)[0]
    border = (-np.array(CLIP_MEAN) / np.array(CLIP_STD)).astype(np.float32)
    inside = ((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(pixels[:, :2, :], np.broadcast_to(border[:, None, None], (3, 2, 14)), atol=1e-6)
    np.testing.assert_allclose(pixels[:, 2:12, 2:12], np.broadcast_to(inside[:, None, None], (3, 10, 10)), atol=1e-6)


@pytest.mark.parametrize(
    "shape, expected",
    [((480, 640), (336, 448)), ((640, 480), (448, 336)), ((336, 336), (336, 336)), ((337, 601), (336, 599)),
     ((100, 301), (336, 1011))],
)
def test_shortest_edge_rule(shape, expected):
    """torchvision's rule: the long edge is int(n * long / short), truncated."""
    assert ImageSpec.from_processor_config(LLAVA15).resized_size(*shape) == expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_manifest_round_trip(name):
    spec = ImageSpec.from_processor_config(CONFIGS[name])
    data = json.loads(json.dumps(spec.to_manifest()))
    assert ImageSpec.from_manifest(data) == spec
    assert data["resample"] == {1: "lanczos", 2: "bilinear", 3: "bicubic"}[spec.resample]
    assert data["resample_code"] == spec.resample
    assert data["resize_rule"] == ("exact" if "height" in CONFIGS[name]["size"] else "shortest_edge")
    assert tuple(data["output_size"]) == spec.output_size


def test_llava15_spec_fields():
    spec = ImageSpec.from_processor_config(LLAVA15)
    by_hand = ImageSpec(
        resize_shortest_edge=336, resize_height_width=None, resample=3, do_center_crop=True,
        crop_height_width=[336, 336], do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    assert by_hand == spec
    assert spec.resize_shortest_edge == 336 and spec.resize_height_width is None
    assert spec.crop_height_width == (336, 336) and spec.output_size == (336, 336)
    assert spec.resample == 3 and spec.image_mean == tuple(CLIP_MEAN) and spec.image_std == tuple(CLIP_STD)
    assert ImageSpec.from_processor_config(EXACT).output_size == (24, 40)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resize_rule": "longest_edge"}, "unknown resize_rule"),
        ({"resample": "bilinear"}, "does not match resample_code"),
        ({"output_size": [224, 224]}, "output_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"do_rescale": "yes"}, "do_rescale"),
        ({"crop_height_width": [336, 0]}, "crop_height_width"),
    ],
)
def test_malformed_manifest(change, message):
    data = ImageSpec.from_processor_config(LLAVA15).to_manifest()
    data.update(change)
    with pytest.raises(AlignerError, match=message):
        ImageSpec.from_manifest(data)


def test_manifest_missing_key():
    data = ImageSpec.from_processor_config(LLAVA15).to_manifest()
    del data["image_std"]
    with pytest.raises(AlignerError, match="lacks image_std"):
        ImageSpec.from_manifest(data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_processor_type": "LlavaNextImageProcessor"}, "LlavaNextImageProcessor is not supported"),
        ({"image_grid_pinpoints": [[336, 672], [672, 336]]}, "image_grid_pinpoints"),
        ({"do_pad": True}, "do_pad"),
        ({"size": {"shortest_edge": 336, "longest_edge": 672}}, "resize rule"),
        ({"do_resize": False}, "do_resize"),
        ({"resample": 9}, "resample"),
        ({"do_center_crop": False}, "no fixed output size"),
        ({"image_std": [0.5, 0.0, 0.5]}, "zero"),
    ],
)
def test_unrepresentable_processor_config(change, message):
    with pytest.raises(AlignerError, match=message):
        ImageSpec.from_processor_config({**LLAVA15, **change})


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(AlignerError, match=f"^image not found: {path}$"):
        preprocess(path, ImageSpec.from_processor_config(TINY))


def test_directory(tmp_path):
    with pytest.raises(AlignerError, match=f"^image path is a directory: {tmp_path}$"):
        load_image(str(tmp_path))


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("not a picture\n")
    with pytest.raises(AlignerError, match=f"^cannot read image {path}: not an image file Pillow can read \\("):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    whole = tmp_path / f"whole{suffix}"
    make_image(64, 64, "RGB").save(whole)
    path = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AlignerError, match=f"^cannot read image {path}: not an image file Pillow can read") as info:
        load_image(path)
    assert "\n" not in str(info.value)
    with PIL_Image.open(path) as lazy, pytest.raises(AlignerError, match="^cannot read image: "):
        preprocess(lazy, ImageSpec.from_processor_config(TINY))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((5, 5, 5), dtype=np.uint8), "shape \\(5, 5, 5\\)"),
        (np.zeros((10,), dtype=np.uint8), "shape \\(10,\\)"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (np.zeros((4, 4, 3), dtype=bool), "dtype bool"),
        (np.full((4, 4, 3), 2.5), "expected \\[0, 1\\]"),
        (np.full((4, 4, 3), 300), "expected \\[0, 255\\]"),
        (np.full((4, 4, 3), np.nan), "NaN"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(AlignerError, match=message):
        load_image(array)


def test_bad_source_type_and_empty_batch():
    spec = ImageSpec.from_processor_config(TINY)
    with pytest.raises(AlignerError, match="got int"):
        preprocess(3, spec)
    with pytest.raises(AlignerError, match="no images"):
        preprocess([], spec)


def test_no_rgb_conversion_rejects_grayscale():
    spec = ImageSpec.from_processor_config({**TINY, "do_convert_rgb": False})
    assert preprocess(make_image(40, 40, "RGB"), spec).shape == (1, 3, 32, 32)
    with pytest.raises(AlignerError, match="mode L"):
        preprocess(make_image(40, 40, "L"), spec)


def test_pillow_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(AlignerError, match="^image input needs Pillow: pip install pillow$"):
        load_image(np.zeros((4, 4, 3), dtype=np.uint8))


def test_no_torch_import(tmp_path):
    """The runtime side preprocesses without importing torch or transformers (docs/architecture.md §2)."""
    path = tmp_path / "a.png"
    make_image(40, 60, "RGB").save(path)
    code = (
        "import sys\n"
        "from aligner_runtime.vision import preprocess\nfrom aligner_runtime.vision_spec import ImageSpec\n"
        "spec = ImageSpec.from_manifest(" + repr(ImageSpec.from_processor_config(TINY).to_manifest()) + ")\n"
        f"assert preprocess([{str(path)!r}], spec).shape == (1, 3, 32, 32)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
