"""LLaVA-NeXT any-resolution preprocessing (aligner_runtime.vision.AnyResSpec) against HF's slow
LlavaNextImageProcessor, LlavaNextProcessor's image-token count and the model's packed feature count (issue 6).

Images are made in the test (seeded noise over smooth gradients) in many sizes, aspect ratios and modes. The HF
comparisons are the reference and skip when transformers is absent; the hand-computed cases do not need it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligner_runtime.errors import AlignerError
from aligner_runtime.vision import preprocess_anyres, preprocess_anyres_batch
from aligner_runtime.vision_spec import AnyResSpec, ImageSpec, spec_from_processor_config

PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is absent: image preprocessing needs it")

from generated_images import make_image, make_pixels  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TINY = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]}
# llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json
LLAVA16 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaNextProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
# An exact base resize and a bilinear filter: the base image is resized to min(h, w) squared, then to (h, w).
EXACT = {"size": {"height": 32, "width": 32}, "crop_size": 32, "do_center_crop": False, "resample": 2,
         "image_grid_pinpoints": [[64, 32], [32, 64], [96, 96]], "image_mean": 0.5, "image_std": 0.5}
CONFIGS = {"tiny": TINY, "llava16": LLAVA16, "exact": EXACT}
PATCH = {"tiny": 8, "llava16": 14, "exact": 8}

SIZES = {  # (height, width): square, portrait, landscape, tiny, extreme ratios, exactly a pinpoint, odd
    "tiny": [(48, 48), (57, 31), (53, 32), (31, 75), (13, 21), (33, 101), (200, 60), (300, 2), (6, 300),
             (64, 64), (96, 32), (32, 64), (130, 129), (7, 7)],
    "llava16": [(336, 336), (480, 640), (1000, 300), (120, 90), (1337, 777), (337, 1601), (672, 672), (40, 900)],
    "exact": [(48, 48), (57, 31), (31, 75), (13, 21), (250, 90)],
}
# Token counts only. Sizes where the unpadding's round(..., 7) differs from truncation (h * (w' / w) lands just
# below an integer), and 1- or 2-row images: HF's pixels for those are wrong (its _pad_for_patching guesses the
# channel axis again and takes a 1-row resized image as channels first) but its count depends on the size alone.
TOKEN_SIZES = {"tiny": [(47, 188), (188, 47), (392, 343), (1, 300), (2, 300), (1, 1), (3, 90)],
               "llava16": [(55, 176), (88, 55), (1, 2000), (3, 3000)], "exact": []}
MODES = ["RGB", "RGBA", "L"]


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is absent: no HF reference to compare")


def hf_processor(config: dict):
    return transformers_or_skip().LlavaNextImageProcessor(**config)


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))


def assert_matches_hf(processor, spec: AnyResSpec, image, hf_image=None, channels_last=True, **hf_kwargs) -> float:
    """Ours for ``image`` against HF's for ``hf_image`` (default: the same image); returns the max difference."""
    ours, size = preprocess_anyres(image, spec)
    if channels_last:
        # HF guesses the channel axis from the shape and takes a 1- or 3-row image as channels first.
        hf_kwargs["input_data_format"] = "channels_last"
    out = processor(image if hf_image is None else hf_image, return_tensors="np", **hf_kwargs)
    theirs = np.asarray(out["pixel_values"])
    assert theirs.shape[0] == 1  # one image: HF's patch axis has no padding
    diff = max_diff(ours, theirs[0])
    assert tuple(int(v) for v in out["image_sizes"][0]) == size
    assert ours.shape[0] == spec.num_tiles(*size)
    return diff


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_pil_images_match_hf(name, mode):
    processor = hf_processor(CONFIGS[name])
    spec = AnyResSpec.from_processor_config(processor.to_dict())
    sizes = SIZES[name] if mode == "RGB" or name != "llava16" else SIZES[name][:3]
    worst = 0.0
    for i, (h, w) in enumerate(sizes):
        image = make_image(h, w, mode, seed=i)
        diff = assert_matches_hf(processor, spec, image)
        worst = max(worst, diff)
        # Same steps in the same dtypes as the slow processor: measured bit-identical (transformers 4.57).
        assert diff == 0.0, (h, w, diff)
    print(f"{name} {mode}: {len(sizes)} images, max |ours - HF| = {worst:.3g}")


@pytest.mark.parametrize("name", ["tiny", "llava16"])
def test_arrays_match_hf(name):
    processor = hf_processor(CONFIGS[name])
    spec = AnyResSpec.from_processor_config(CONFIGS[name])
    rng = np.random.default_rng(4)
    for i, (h, w) in enumerate(SIZES[name][:5]):
        rgb = make_pixels(h, w, 3, seed=10 + i)
        assert assert_matches_hf(processor, spec, rgb) == 0.0
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        assert assert_matches_hf(processor, spec, chw, channels_last=False) == 0.0
        # HF takes RGBA arrays only as PIL images; the array path must equal that.
        rgba = make_pixels(h, w, 4, seed=20 + i)
        assert assert_matches_hf(processor, spec, rgba, hf_image=PIL_Image.fromarray(rgba)) == 0.0
        # A float array in [0, 1] is HF's input with do_rescale=False.
        floats = rng.random((h, w, 3)).astype(np.float32)
        assert assert_matches_hf(processor, spec, floats, do_rescale=False) == 0.0


def test_image_files_match_hf(tmp_path):
    processor = hf_processor(LLAVA16)
    spec = AnyResSpec.from_processor_config(LLAVA16)
    for i, ((h, w), suffix) in enumerate(zip(SIZES["llava16"][1:4], [".png", ".jpg", ".png"])):
        path = tmp_path / f"img{i}{suffix}"
        make_image(h, w, "RGB", seed=40 + i).save(path)
        assert assert_matches_hf(processor, spec, path, hf_image=str(path)) == 0.0
    # EXIF orientation: HF's load_image transposes, so the original size is the displayed one.
    exif = PIL_Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    make_image(200, 700, "RGB", seed=7).save(path, exif=exif.tobytes())
    assert assert_matches_hf(processor, spec, path, hf_image=str(path)) == 0.0
    assert preprocess_anyres(path, spec)[1] == (700, 200)


def test_batch_pads_like_hf():
    """Several images: HF zero-pads the patch axis to the longest image (do_pad)."""
    processor = hf_processor(TINY)
    spec = AnyResSpec.from_processor_config(TINY)
    images = [make_image(h, w, "RGB", seed=60 + i) for i, (h, w) in enumerate(SIZES["tiny"][:6])]
    pixels, sizes = preprocess_anyres_batch(images, spec)
    out = processor(images, return_tensors="np", input_data_format="channels_last")
    counts = [spec.num_tiles(h, w) for h, w in sizes]
    assert len(set(counts)) > 1  # the padding is exercised
    assert max_diff(pixels, np.asarray(out["pixel_values"])) == 0.0
    assert np.array_equal(sizes, np.asarray(out["image_sizes"]))
    for i, count in enumerate(counts):
        assert not pixels[i, count:].any()


def test_best_resolution_and_grid_match_hf():
    transformers_or_skip()
    from transformers.image_processing_utils import select_best_resolution

    rng = np.random.default_rng(5)
    sizes = [tuple(int(v) for v in pair) for pair in rng.integers(1, 2500, size=(400, 2))]
    sizes += [(336, 336), (672, 336), (336, 672), (1, 1), (1, 5000), (5000, 1)]
    for name in ("tiny", "llava16", "exact"):
        spec = AnyResSpec.from_processor_config(CONFIGS[name])
        pinpoints = CONFIGS[name]["image_grid_pinpoints"]
        for h, w in sizes:
            best = select_best_resolution((h, w), pinpoints)
            assert spec.best_resolution(h, w) == tuple(best)
            assert spec.grid_shape(h, w) == (best[0] // spec.tile_size[0], best[1] // spec.tile_size[1])
    # numpy integers (HF's image_sizes) are taken as sizes
    spec = AnyResSpec.from_processor_config(LLAVA16)
    assert spec.best_resolution(np.int64(480), np.int32(640)) == (672, 672)


def test_by_hand_llava16_640x480():
    """Independent of HF: a 640x480 (w x h) photo on LLaVA-v1.6, worked out on paper."""
    spec = AnyResSpec.from_processor_config(LLAVA16)
    # (672, 672) keeps all 307200 pixels (scale 1.05); (336, 672) keeps 448 x 336 only.
    assert spec.best_resolution(480, 640) == (672, 672)
    assert spec.grid_shape(480, 640) == (2, 2)
    # 24 x 24 patches per tile; the 48 x 48 map loses 6 rows top and bottom (480 * 48 / 640 = 36 rows):
    # 36 * 48 unpadded + 36 newlines + 576 base (CLS added then dropped by "default").
    assert spec.num_image_tokens(480, 640, 14, "default") == 36 * 48 + 36 + 576
    assert spec.num_image_tokens(480, 640, 14, "full", num_additional_image_tokens=1) == 36 * 48 + 36 + 577
    assert spec.num_image_tokens(480, 640, 14, "default", num_additional_image_tokens=0) == 36 * 48 + 36 + 575


def test_constant_image_tiles_by_hand():
    """Independent of HF: a constant 16x64 image on the tiny grid is resized into (32, 64), padded 8 rows top and
    bottom with zeros, and cut into two 32x32 tiles; the base image is the colour throughout."""
    spec = AnyResSpec.from_processor_config(TINY)
    color = np.array([200, 17, 96], dtype=np.uint8)
    pixels, size = preprocess_anyres(np.broadcast_to(color, (16, 64, 3)).copy(), spec)
    assert size == (16, 64)
    assert pixels.shape == (3, 3, 32, 32)

    def normalized(value):
        return ((np.asarray(value, np.float64) / 255 - CLIP_MEAN) / CLIP_STD).astype(np.float32)

    inside, zero = normalized(color), normalized([0, 0, 0])
    np.testing.assert_allclose(pixels[0], np.broadcast_to(inside[:, None, None], (3, 32, 32)), atol=1e-6)
    for tile in pixels[1:]:
        np.testing.assert_allclose(tile[:, 8:24], np.broadcast_to(inside[:, None, None], (3, 16, 32)), atol=1e-6)
        for rows in (slice(0, 8), slice(24, 32)):
            np.testing.assert_allclose(tile[:, rows], np.broadcast_to(zero[:, None, None], (3, 8, 32)), atol=1e-6)


def build_llava_next_processor(config: dict, patch_size: int, strategy: str, extra: int):
    transformers = transformers_or_skip()
    import tiny_models

    tokenizer = tiny_models.build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(**config), tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
    )


@pytest.mark.parametrize("name", ["tiny", "llava16"])
@pytest.mark.parametrize("strategy, extra", [("default", 1), ("default", 0), ("full", 0), ("full", 1)])
def test_num_image_tokens_match_processor(name, strategy, extra):
    processor = build_llava_next_processor(CONFIGS[name], PATCH[name], strategy, extra)
    spec = AnyResSpec.from_processor_config(processor.image_processor.to_dict())
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    sizes = SIZES[name] + TOKEN_SIZES[name]
    images = [make_image(h, w, "RGB", seed=70 + i) for i, (h, w) in enumerate(sizes)]
    out = processor(images=images, text=["look <image> here"] * len(images), input_data_format="channels_last")
    counts = [row.count(image_id) for row in out["input_ids"]]
    ours = [spec.num_image_tokens(h, w, PATCH[name], strategy, num_additional_image_tokens=extra) for h, w in sizes]
    print(f"{name} {strategy} +{extra}: {dict(zip(sizes, counts))}")
    assert ours == counts
    assert len(set(counts)) > 2  # the count follows the image's size and shape


def test_num_image_tokens_match_model_features():
    """The count equals what the model packs (base features, unpadded tiles, newlines) for a CLIP tower with CLS."""
    transformers = transformers_or_skip()
    torch = pytest.importorskip("torch", reason="torch is absent: no HF model to count features")
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text,
                                          image_grid_pinpoints=TINY["image_grid_pinpoints"],
                                          vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.LlavaNextModel(config).eval()
    spec = AnyResSpec.from_processor_config(TINY)
    sizes = SIZES["tiny"] + TOKEN_SIZES["tiny"]
    pixels, image_sizes = preprocess_anyres_batch(
        [make_image(h, w, "RGB", seed=80 + i) for i, (h, w) in enumerate(sizes)], spec)
    with torch.no_grad():
        features = model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(image_sizes))
    lengths = [int(f.shape[0]) for f in features]
    assert lengths == [spec.num_image_tokens(h, w, 8, "default") for h, w in sizes]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    assert [spec.num_tiles(h, w) for h, w in sizes] == [
        image_size_to_num_patches((h, w), TINY["image_grid_pinpoints"], 32) for h, w in sizes]


def test_manifest_round_trip():
    for config in CONFIGS.values():
        spec = AnyResSpec.from_processor_config(config)
        data = json.loads(json.dumps(spec.to_manifest()))
        assert AnyResSpec.from_manifest(data) == spec
        assert data["kind"] == "anyres"
        assert data["base"] == spec.base.to_manifest()
        assert data["grid_pinpoints"] == [list(p) for p in config["image_grid_pinpoints"]]
    spec = AnyResSpec.from_processor_config(LLAVA16)
    assert spec.tile_size == (336, 336)
    assert spec.base == ImageSpec.from_processor_config(
        {k: v for k, v in LLAVA16.items() if k not in ("image_grid_pinpoints", "do_pad", "image_processor_type")})
    # from the saved processor, as an export reads preprocessor_config.json
    saved = json.loads(hf_processor(LLAVA16).to_json_string())
    assert AnyResSpec.from_processor_config(saved) == spec


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("tile_size"), "lacks tile_size"),
    (lambda d: d.update(kind="clip"), "kind 'clip' is not 'anyres'"),
    (lambda d: d.update(tile_size=[32, 16]), "tiles must be square"),
    (lambda d: d.update(tile_size=[16, 16]), "CLIP steps give"),
    (lambda d: d.update(grid_pinpoints=[]), "image_grid_pinpoints is empty"),
    (lambda d: d.update(grid_pinpoints=[[32, 48]]), r"\[32, 48\] is not a multiple of the tile size 32"),
    (lambda d: d.update(grid_pinpoints="32x64"), "grid_pinpoints must be a list"),
    (lambda d: d["base"].pop("image_std"), "lacks image_std"),
])
def test_bad_manifest(mutate, message):
    data = AnyResSpec.from_processor_config(TINY).to_manifest()
    mutate(data)
    with pytest.raises(AlignerError, match=message):
        AnyResSpec.from_manifest(data)


@pytest.mark.parametrize("config, message", [
    ({**TINY, "image_processor_type": "CLIPImageProcessor"}, "not LlavaNextImageProcessor"),
    ({**TINY, "image_grid_pinpoints": [[32, 50]]}, r"\[32, 50\] is not a multiple of the tile size 32"),
    ({**TINY, "image_grid_pinpoints": [[32]]}, "must be \\[height, width\\]"),
    ({**TINY, "image_grid_pinpoints": [[0, 32]]}, "positive integer"),
    ({**TINY, "image_grid_pinpoints": 32}, "must be a list of \\[height, width\\]"),
    ({**TINY, "crop_size": {"height": 32, "width": 64}}, "CLIP steps give \\(32, 64\\) images but the tiles are"),
    ({**TINY, "crop_size": {"shortest_edge": 32}}, "crop_size"),
    ({**TINY, "do_pad": "yes"}, "do_pad must be true or false"),
    ({**TINY, "do_resize": False}, "do_resize=false"),
    # LlavaNextImageProcessor's default pinpoints are for 336 tiles; its default crop is 224
    ({k: v for k, v in TINY.items() if k not in ("image_grid_pinpoints", "crop_size")}, "tile size 224"),
    ("not a dict", "must be a dict"),
])
def test_bad_processor_config(config, message):
    with pytest.raises(AlignerError, match=message):
        AnyResSpec.from_processor_config(config)


@pytest.mark.parametrize("args, message", [
    ((480, 640, 0, "default"), "patch_size must be a positive integer"),
    ((480, 640, 14, "cls"), "vision_feature_select_strategy 'cls'"),
    ((0, 640, 14, "default"), "image size must be two positive integers"),
    ((480.0, 640, 14, "default"), "image size must be two positive integers"),
    ((480, 640, 400, "default"), "larger than the tiles"),
])
def test_bad_token_count_arguments(args, message):
    spec = AnyResSpec.from_processor_config(LLAVA16)
    with pytest.raises(AlignerError, match=message):
        spec.num_image_tokens(*args)
    with pytest.raises(AlignerError, match="num_additional_image_tokens"):
        spec.num_image_tokens(480, 640, 14, "default", num_additional_image_tokens=-1)


def test_spec_from_processor_config_picks_the_kind():
    assert isinstance(spec_from_processor_config(LLAVA16), AnyResSpec)
    assert isinstance(spec_from_processor_config(TINY), AnyResSpec)  # pinpoints and no processor type
    clip = {"size": {"shortest_edge": 32}, "crop_size": 32, "image_processor_type": "CLIPImageProcessor"}
    assert isinstance(spec_from_processor_config(clip), ImageSpec)
    # ImageSpec refuses a LLaVA-NeXT config and says what to use instead
    with pytest.raises(AlignerError, match="LlavaNextImageProcessor is not supported by ImageSpec.*AnyResSpec"):
        ImageSpec.from_processor_config(LLAVA16)
    with pytest.raises(AlignerError, match="image_grid_pinpoints.*AnyResSpec"):
        ImageSpec.from_processor_config(TINY)
    with pytest.raises(AlignerError, match="must be a dict"):
        spec_from_processor_config(None)


def test_preprocess_anyres_takes_one_image():
    spec = AnyResSpec.from_processor_config(TINY)
    with pytest.raises(AlignerError, match="takes one image"):
        preprocess_anyres([make_image(20, 20, "RGB")], spec)
    with pytest.raises(AlignerError, match="no images"):
        preprocess_anyres_batch([], spec)
    with pytest.raises(AlignerError, match="^image not found: "):
        preprocess_anyres("/nonexistent/picture.png", spec)
