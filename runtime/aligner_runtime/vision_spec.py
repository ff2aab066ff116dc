"""What a vision-language export records about image preprocessing (``ImageSpec`` for LLaVA, ``AnyResSpec`` for
LLaVA-NeXT): read from an HF ``preprocessor_config.json`` at export time, written to and read back from the
manifest's ``multimodal.preprocessing``, every value checked. The preprocessing itself is ``aligner_runtime.vision``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import AlignerError

# Pillow's resample codes, which HF stores in preprocessor_config.json as "resample".
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE_CODES = {name: code for code, name in RESAMPLE_NAMES.items()}

# CLIPImageProcessor's defaults, used for keys a config leaves out (as CLIPImageProcessor(**config) would).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast")
# The fast class's to_dict() carries the same settings; what is reproduced is the slow class's output.
_ANYRES_PROCESSORS = ("LlavaNextImageProcessor", "LlavaNextImageProcessorFast")
# LlavaNextImageProcessor's defaults for keys a config leaves out.
_LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_ANYRES_MANIFEST_KEYS = ("kind", "base", "grid_pinpoints", "tile_size")
_FEATURE_STRATEGIES = ("default", "full")
_MANIFEST_KEYS = (
    "resize_rule", "resize_shortest_edge", "resize_height_width", "resample", "resample_code", "do_center_crop",
    "crop_height_width", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
    "output_size",
)


@dataclass(frozen=True)
class ImageSpec:
    """How a LLaVA export turns an image into ``pixel_values`` (recorded in the manifest)."""

    # Exactly one of the two resize rules is set: the shortest edge (keeps the aspect ratio) or (height, width).
    resize_shortest_edge: int | None
    resize_height_width: tuple[int, int] | None
    resample: int
    do_center_crop: bool
    crop_height_width: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_convert_rgb: bool

    def __post_init__(self) -> None:
        if (self.resize_shortest_edge is None) == (self.resize_height_width is None):
            raise AlignerError("image spec: give exactly one of resize_shortest_edge and resize_height_width")
        if self.resize_shortest_edge is not None:
            _positive_int(self.resize_shortest_edge, "resize_shortest_edge")
        # Lists become tuples, so that specs compare equal however they were built.
        for name in ("resize_height_width", "crop_height_width"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _hw_pair(getattr(self, name), name))
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, _triple(getattr(self, name), name))
        if self.resample not in RESAMPLE_NAMES:
            raise AlignerError(f"image spec: unknown resample code {self.resample!r} (known: {sorted(RESAMPLE_NAMES)})")
        if self.do_center_crop:
            if self.crop_height_width is None:
                raise AlignerError("image spec: do_center_crop is set but crop_height_width is missing")
        elif self.resize_height_width is None:
            # The vision graph takes one fixed size; a shortest-edge resize alone gives a size per image.
            raise AlignerError("image spec: a shortest_edge resize without a center crop has no fixed output size")
        if not (isinstance(self.rescale_factor, (int, float)) and math.isfinite(self.rescale_factor)):
            raise AlignerError(f"image spec: rescale_factor must be a finite number, got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if not all(math.isfinite(v) for v in values):
                raise AlignerError(f"image spec: {name} must be 3 finite numbers, got {values!r}")
        if self.do_normalize and any(v == 0 for v in self.image_std):
            raise AlignerError(f"image spec: image_std has a zero: {self.image_std!r}")

    @classmethod
    def from_processor_config(cls, config: dict) -> ImageSpec:
        """From HF's preprocessor_config.json dict (or ``image_processor.to_dict()``) of a CLIPImageProcessor."""
        if not isinstance(config, dict):
            raise AlignerError(f"image processor config must be a dict, got {type(config).__name__}")
        kind = config.get("image_processor_type")
        if kind in _ANYRES_PROCESSORS:
            raise AlignerError(f"image processor {kind} is not supported by ImageSpec: LLaVA-NeXT any-resolution "
                               "preprocessing needs AnyResSpec (spec_from_processor_config picks it)")
        if kind is not None and kind not in _SUPPORTED_PROCESSORS:
            raise AlignerError(
                f"image processor {kind} is not supported: only CLIPImageProcessor preprocessing (LLaVA-1.5 style) "
                "and LlavaNextImageProcessor (LLaVA-NeXT) can be exported"
            )
        if config.get("image_grid_pinpoints"):
            raise AlignerError("image processor uses image_grid_pinpoints (LLaVA-NeXT any-resolution tiling), "
                               "which ImageSpec cannot represent: use AnyResSpec (spec_from_processor_config picks it)")
        for key in ("do_pad", "crop_to_patches", "do_image_splitting"):
            if config.get(key):
                raise AlignerError(
                    f"image processor sets {key}, which CLIPImageProcessor preprocessing cannot represent"
                )
        if config.get("do_resize", True) is not True:
            raise AlignerError("image processor sets do_resize=false; the export needs a fixed-size resize")

        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"shortest_edge": size}  # HF's get_size_dict(default_to_square=False)
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if not isinstance(size, dict):
            raise AlignerError(f"image processor size {size!r} is not a resize rule this runtime knows")
        shortest_edge = None
        height_width = None
        if set(size) == {"shortest_edge"}:
            shortest_edge = size["shortest_edge"]
        elif set(size) == {"height", "width"}:
            height_width = (size["height"], size["width"])
        else:
            raise AlignerError(
                f"image processor size {size!r} is not a resize rule this runtime knows "
                "(expected {'shortest_edge': n} or {'height': h, 'width': w})"
            )

        do_center_crop = _flag(config, "do_center_crop", True)
        crop = None
        if do_center_crop:
            crop_size = config.get("crop_size", {"height": 224, "width": 224})
            if isinstance(crop_size, int) and not isinstance(crop_size, bool):
                crop_size = {"height": crop_size, "width": crop_size}  # get_size_dict(default_to_square=True)
            if not (isinstance(crop_size, dict) and set(crop_size) == {"height", "width"}):
                raise AlignerError(f"image processor crop_size {crop_size!r} must be {{'height': h, 'width': w}}")
            crop = (crop_size["height"], crop_size["width"])

        return cls(
            resize_shortest_edge=shortest_edge,
            resize_height_width=height_width,
            resample=_resample_code(config.get("resample", 3)),
            do_center_crop=do_center_crop,
            crop_height_width=crop,
            do_rescale=_flag(config, "do_rescale", True),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            do_normalize=_flag(config, "do_normalize", True),
            image_mean=_triple(config.get("image_mean", _CLIP_MEAN), "image_mean"),
            image_std=_triple(config.get("image_std", _CLIP_STD), "image_std"),
            do_convert_rgb=_flag(config, "do_convert_rgb", True),
        )

    def to_manifest(self) -> dict:
        """A JSON-able dict for the export manifest; :meth:`from_manifest` reads it back."""
        return {
            "resize_rule": "shortest_edge" if self.resize_shortest_edge is not None else "exact",
            "resize_shortest_edge": self.resize_shortest_edge,
            "resize_height_width": list(self.resize_height_width) if self.resize_height_width else None,
            "resample": RESAMPLE_NAMES[self.resample],
            "resample_code": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_height_width": list(self.crop_height_width) if self.crop_height_width else None,
            "do_rescale": self.do_rescale,
            "rescale_factor": float(self.rescale_factor),
            "do_normalize": self.do_normalize,
            "image_mean": [float(v) for v in self.image_mean],
            "image_std": [float(v) for v in self.image_std],
            "do_convert_rgb": self.do_convert_rgb,
            "output_size": list(self.output_size),
        }

    @classmethod
    def from_manifest(cls, data: dict) -> ImageSpec:
        _manifest_object(data, _MANIFEST_KEYS, "image preprocessing")
        rule = data["resize_rule"]
        if rule == "shortest_edge":
            shortest_edge, height_width = data["resize_shortest_edge"], None
        elif rule == "exact":
            shortest_edge, height_width = None, _hw_pair(data["resize_height_width"], "resize_height_width")
        else:
            raise AlignerError(f"manifest image preprocessing: unknown resize_rule {rule!r} (shortest_edge, exact)")
        code = data["resample_code"]
        if _RESAMPLE_CODES.get(data["resample"]) != code or isinstance(code, bool):
            raise AlignerError(
                f"manifest image preprocessing: resample {data['resample']!r} does not match resample_code {code!r}"
            )
        crop = data["crop_height_width"]
        spec = cls(
            resize_shortest_edge=shortest_edge,
            resize_height_width=height_width,
            resample=code,
            do_center_crop=_bool(data["do_center_crop"], "do_center_crop"),
            crop_height_width=_hw_pair(crop, "crop_height_width") if crop is not None else None,
            do_rescale=_bool(data["do_rescale"], "do_rescale"),
            rescale_factor=data["rescale_factor"],
            do_normalize=_bool(data["do_normalize"], "do_normalize"),
            image_mean=_triple(data["image_mean"], "image_mean"),
            image_std=_triple(data["image_std"], "image_std"),
            do_convert_rgb=_bool(data["do_convert_rgb"], "do_convert_rgb"),
        )
        if list(spec.output_size) != data["output_size"]:
            raise AlignerError(
                f"manifest image preprocessing: output_size {data['output_size']!r} does not follow from the "
                f"resize and crop (expected {list(spec.output_size)})"
            )
        return spec

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of ``pixel_values``."""
        if self.do_center_crop:
            return self.crop_height_width
        return self.resize_height_width

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after the resize step, by HF's ``get_resize_output_image_size``."""
        if self.resize_height_width is not None:
            return self.resize_height_width
        size = self.resize_shortest_edge
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


@dataclass(frozen=True)
class AnyResSpec:
    """How a LLaVA-NeXT export turns an image into tiles (``LlavaNextImageProcessor``; recorded in the manifest)."""

    base: ImageSpec  # the CLIP steps applied to the base image and to every tile
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) candidates, in HF's order (it breaks ties)
    tile_size: tuple[int, int]  # (height, width) of a tile, HF's crop_size["height"] squared

    def __post_init__(self) -> None:
        if not isinstance(self.base, ImageSpec):
            raise AlignerError(f"anyres spec: base must be an ImageSpec, got {type(self.base).__name__}")
        pinpoints = self.grid_pinpoints
        if isinstance(pinpoints, (str, bytes, dict)) or not isinstance(pinpoints, Iterable):
            raise AlignerError(f"image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}")
        pinpoints = tuple(_hw_pair(p, "image_grid_pinpoints entry") for p in pinpoints)
        if not pinpoints:
            raise AlignerError("image_grid_pinpoints is empty")
        object.__setattr__(self, "grid_pinpoints", pinpoints)
        tile = _hw_pair(self.tile_size, "tile_size")
        object.__setattr__(self, "tile_size", tile)
        # HF cuts square tiles of crop_size["height"]; the model's grid is best // vision image_size on both axes.
        if tile[0] != tile[1]:
            raise AlignerError(f"anyres tiles must be square (LLaVA-NeXT cuts crop_size['height'] squares), got {tile}")
        if tuple(self.base.output_size) != tile:
            raise AlignerError(f"anyres: the CLIP steps give {tuple(self.base.output_size)} images but the tiles are "
                               f"{tile}; LLaVA-NeXT needs both the same")
        for height, width in pinpoints:
            if height % tile[0] or width % tile[1]:
                # HF would cut partial tiles that the model's grid (best // image_size) does not count.
                raise AlignerError(f"image_grid_pinpoints entry {[height, width]} is not a multiple of the tile size "
                                   f"{tile[0]}")

    @classmethod
    def from_processor_config(cls, config: dict) -> AnyResSpec:
        """From HF's preprocessor_config.json dict (or ``image_processor.to_dict()``) of a LlavaNextImageProcessor."""
        if not isinstance(config, dict):
            raise AlignerError(f"image processor config must be a dict, got {type(config).__name__}")
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _ANYRES_PROCESSORS:
            raise AlignerError(f"image processor {kind} is not LlavaNextImageProcessor: AnyResSpec cannot represent "
                               "it")
        pinpoints = config.get("image_grid_pinpoints")
        if pinpoints is None:
            pinpoints = _LLAVA_NEXT_PINPOINTS
        # do_pad pads the patch axis of a batch to its longest image (preprocess_anyres_batch); a bool either way.
        _flag(config, "do_pad", True)
        clip = {k: v for k, v in config.items() if k not in ("image_processor_type", "image_grid_pinpoints", "do_pad")}
        clip.setdefault("crop_size", {"height": 224, "width": 224})
        base = ImageSpec.from_processor_config(clip)
        crop_size = clip["crop_size"]
        if isinstance(crop_size, int) and not isinstance(crop_size, bool):
            crop_size = {"height": crop_size, "width": crop_size}  # get_size_dict(default_to_square=True)
        if not (isinstance(crop_size, dict) and set(crop_size) == {"height", "width"}):
            raise AlignerError(f"image processor crop_size {crop_size!r} must be {{'height': h, 'width': w}}")
        side = _positive_int(crop_size["height"], "crop_size height")
        return cls(base=base, grid_pinpoints=pinpoints, tile_size=(side, side))

    def to_manifest(self) -> dict:
        """A JSON-able dict for the export manifest; :meth:`from_manifest` reads it back."""
        return {
            "kind": "anyres",
            "base": self.base.to_manifest(),
            "grid_pinpoints": [list(p) for p in self.grid_pinpoints],
            "tile_size": list(self.tile_size),
        }

    @classmethod
    def from_manifest(cls, data: dict) -> AnyResSpec:
        _manifest_object(data, _ANYRES_MANIFEST_KEYS, "anyres image preprocessing")
        if data["kind"] != "anyres":
            raise AlignerError(f"manifest image preprocessing: kind {data['kind']!r} is not 'anyres'")
        pinpoints = data["grid_pinpoints"]
        if not isinstance(pinpoints, list):
            raise AlignerError(f"manifest image preprocessing: grid_pinpoints must be a list, got {pinpoints!r}")
        return cls(base=ImageSpec.from_manifest(data["base"]), grid_pinpoints=pinpoints,
                   tile_size=_hw_pair(data["tile_size"], "tile_size"))

    @property
    def base_resize(self) -> int:
        """Side of the square the whole image is resized to before the CLIP steps (HF's get_image_patches)."""
        if self.base.resize_shortest_edge is not None:
            return self.base.resize_shortest_edge
        return min(self.base.resize_height_width)

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """HF's ``select_best_resolution``: the pinpoint that keeps the most pixels, then wastes the fewest."""
        height, width = _image_size(height, width)
        best_fit = None
        max_effective, min_wasted = 0, float("inf")
        for pin_height, pin_width in self.grid_pinpoints:
            # Same float expressions as HF, so ties and truncations fall the same way.
            scale = min(pin_width / width, pin_height / height)
            down_width, down_height = int(width * scale), int(height * scale)
            effective = min(down_width * down_height, width * height)
            wasted = pin_width * pin_height - effective
            if effective > max_effective or (effective == max_effective and wasted < min_wasted):
                max_effective, min_wasted = effective, wasted
                best_fit = (pin_height, pin_width)
        return best_fit

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of (height, width): the model's ``get_anyres_image_grid_shape``."""
        best_height, best_width = self.best_resolution(height, width)
        return best_height // self.tile_size[0], best_width // self.tile_size[1]

    def num_tiles(self, height: int, width: int) -> int:
        """Images in ``pixel_values`` for one image: the base image and its tiles."""
        rows, cols = self.grid_shape(height, width)
        return 1 + rows * cols

    def num_image_tokens(self, height: int, width: int, patch_size: int, strategy: str,
                         num_additional_image_tokens: int = 1) -> int:
        """Image tokens ``LlavaNextProcessor`` puts in the prompt for an image of (height, width).

        The base image's patches, the tile grid's patch map unpadded to the image's aspect ratio, and one newline
        per row of that map (``_get_number_of_features``). ``num_additional_image_tokens`` counts the vision tower's
        extra outputs (CLIP's CLS: 1), which the "default" strategy drops: with 1, the count equals the model's
        packed feature count; HF's processor defaults to 0, which llava-hf's processor configs override with 1.
        """
        patch_size = _positive_int(patch_size, "patch_size")
        if strategy not in _FEATURE_STRATEGIES:
            raise AlignerError(f"vision_feature_select_strategy {strategy!r} is not one of {_FEATURE_STRATEGIES}")
        if isinstance(num_additional_image_tokens, bool) or not isinstance(num_additional_image_tokens, int) \
                or num_additional_image_tokens < 0:
            raise AlignerError(f"num_additional_image_tokens must be an integer >= 0, got "
                               f"{num_additional_image_tokens!r}")
        height, width = _image_size(height, width)
        tile_height, tile_width = self.tile_size
        best_height, best_width = self.best_resolution(height, width)
        patches_height, patches_width = tile_height // patch_size, tile_width // patch_size
        if patches_height == 0:
            raise AlignerError(f"patch_size {patch_size} is larger than the tiles {self.tile_size}")
        current_height = patches_height * (best_height // tile_height)
        current_width = patches_width * (best_width // tile_width)
        # _get_unpadded_features / unpad_image: drop the rows (columns) that are the resize's zero padding.
        if width / height > current_width / current_height:
            new_height = int(round(height * (current_width / width), 7))
            current_height -= (current_height - new_height) // 2 * 2
        else:
            new_width = int(round(width * (current_height / height), 7))
            current_width -= (current_width - new_width) // 2 * 2
        tokens = current_height * current_width + current_height  # the unpadded map and a newline per row
        tokens += patches_height * patches_width + num_additional_image_tokens
        return tokens - 1 if strategy == "default" else tokens


def spec_from_processor_config(config: dict) -> ImageSpec | AnyResSpec:
    """:class:`AnyResSpec` for a LlavaNextImageProcessor config, :class:`ImageSpec` for a CLIPImageProcessor one."""
    if not isinstance(config, dict):
        raise AlignerError(f"image processor config must be a dict, got {type(config).__name__}")
    kind = config.get("image_processor_type")
    if kind in _ANYRES_PROCESSORS or (kind is None and "image_grid_pinpoints" in config):
        return AnyResSpec.from_processor_config(config)
    return ImageSpec.from_processor_config(config)


def _manifest_object(data, keys, what: str) -> dict:
    if not isinstance(data, dict):
        raise AlignerError(f"manifest {what} must be an object, got {type(data).__name__}")
    missing = [key for key in keys if key not in data]
    if missing:
        raise AlignerError(f"manifest {what} lacks {', '.join(missing)}")
    return data


def _flag(config: dict, key: str, default: bool) -> bool:
    return _bool(config.get(key, default), key)


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise AlignerError(f"image preprocessing {name} must be true or false, got {value!r}")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AlignerError(f"image preprocessing {name} must be a positive integer, got {value!r}")
    return value


def _hw_pair(value, name: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise AlignerError(f"image preprocessing {name} must be [height, width], got {value!r}")
    return (_positive_int(value[0], name), _positive_int(value[1], name))


def _image_size(height, width) -> tuple[int, int]:
    """An image's (height, width) as plain ints; numpy integers (HF's image_sizes) are welcome."""
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise AlignerError(f"image size must be two positive integers (height, width), got {(height, width)!r}")
    return int(height), int(width)


def _triple(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3  # HF repeats a scalar mean/std per channel
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes, dict)):
        raise AlignerError(f"image preprocessing {name} must be 3 numbers, got {value!r}")
    values = list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise AlignerError(f"image preprocessing {name} must be 3 numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _resample_code(value) -> int:
    if isinstance(value, str) and value.lower() in _RESAMPLE_CODES:
        return _RESAMPLE_CODES[value.lower()]
    if isinstance(value, bool) or not isinstance(value, int) or value not in RESAMPLE_NAMES:
        raise AlignerError(f"image processor resample {value!r} is not a Pillow filter code {sorted(RESAMPLE_NAMES)}")
    return value
