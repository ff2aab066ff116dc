"""Vision-language export (issue 6): a LLaVA or LLaVA-NeXT model as three graphs that the torch-free runtime chains.

- ``vision.onnx``: ``pixel_values [N,3,H,W] float32 -> image_features [N,F,hidden]``: the vision tower, the feature
  layer and selection strategy of the config (``default`` drops CLS), and the multimodal projector. For LLaVA-NeXT
  the N rows are one image's base view and tiles, and a second output ``image_newline [hidden]`` carries the learned
  row separator; the runtime packs them (``aligner_runtime.multimodal.pack_anyres_features``);
- ``embed.onnx``: ``input_ids [B,S] int64 -> inputs_embeds [B,S,hidden]``: the language model's embedding matrix;
- ``model.onnx``: the language model with ``inputs_embeds`` instead of ``input_ids``, KV cache and the steering
  nodes of docs/architecture.md §5, exactly as for a text model.

The runtime embeds the prompt, replaces the rows at the image-token positions by the image features (as
``LlavaModel.forward`` does with ``masked_scatter``), and drives ``model.onnx`` with the gate protocol of §5. The
manifest's ``multimodal`` object describes the graphs, the image token, the number of features per image and the
preprocessing (:class:`aligner_runtime.vision_spec.ImageSpec`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from aligner_runtime.chat import render_chat
from aligner_runtime.contract import EMBED_FILE, INPUT_IDS, INPUTS_EMBEDS, MODEL_FILE, VISION_FILE
from aligner_runtime.errors import AlignerError
from aligner_runtime.multimodal import merge_image_features, pack_anyres_features
from aligner_runtime.tokenizer import SPECIAL_TOKEN_KEYS
from aligner_runtime.vision_spec import AnyResSpec, spec_from_processor_config

from aligner_export.graph.locate import _dtype, embedding_value
from aligner_export.hf.validate import PROMPTS, check_rounds, run_rounds
from aligner_export.ort import ort_session


IMAGE_FEATURES = "image_features"


def vision_module(vlm):
    """The vision graph's module: pixel_values -> projected image features, one row per image (or tile); for
    LLaVA-NeXT also the learned image_newline vector."""
    # deferred: torch, only when a vision-language model is exported
    import torch

    class Vision(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model.model
            self.dtype = next(model.parameters()).dtype

        def forward(self, pixel_values):
            cfg = self.model.config
            out = self.model.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
            layers = cfg.vision_feature_layer
            layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
            hidden = [out.hidden_states[layer] for layer in layers]
            if cfg.vision_feature_select_strategy == "default":
                hidden = [h[:, 1:] for h in hidden]
            features = self.model.multi_modal_projector(torch.cat(hidden, dim=-1))
            newline = getattr(self.model, "image_newline", None)
            return features if newline is None else (features, newline * 1.0)

    return Vision(vlm).eval()


def is_anyres(spec) -> bool:
    """LLaVA-NeXT's preprocessing (:class:`aligner_runtime.vision_spec.AnyResSpec`) rather than LLaVA's."""
    return isinstance(spec, AnyResSpec)


def vision_input_size(spec) -> tuple[int, int]:
    """(H, W) of the vision graph's pixel_values: the crop for LLaVA, the tile for LLaVA-NeXT."""
    return tuple(spec.tile_size) if is_anyres(spec) else tuple(spec.output_size)


def export_vision(vlm, path: Path, image_size: tuple[int, int], opset: int) -> None:
    """TorchScript-traced export (the vision tower has no cache and no data-dependent control flow)."""
    # deferred: torch, only when a vision-language model is exported
    import torch

    dummy = torch.zeros(2, 3, *image_size, dtype=torch.float32)
    outputs = [IMAGE_FEATURES] + (["image_newline"] if getattr(vlm.model, "image_newline", None) is not None else [])
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(vision_module(vlm), (dummy,), str(path), input_names=["pixel_values"],
                              output_names=outputs, opset_version=opset, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "num_images"}, IMAGE_FEATURES: {0: "num_images"}})
    except Exception as exc:  # the tracer raises many kinds; all mean "this vision tower does not export"
        raise AlignerError(f"the vision tower does not export to ONNX: {str(exc).splitlines()[0]}") from None
    if len(outputs) > 1:
        # The tracer folds the constant image_newline into an initializer and names the output after it.
        model = onnx.load(str(path))
        output = model.graph.output[1]
        if output.name != "image_newline":
            model.graph.node.append(helper.make_node("Identity", [output.name], ["image_newline"],
                                                     name="/image_newline/Identity"))
            output.name = "image_newline"
            onnx.checker.check_model(model)
            onnx.save(model, str(path))


def export_embed(vlm, path: Path) -> None:
    """``input_ids -> inputs_embeds``: one Gather over the language model's embedding matrix."""
    # deferred: torch, only when a vision-language model is exported
    import torch

    weight = vlm.get_input_embeddings().weight.detach()
    half = weight.dtype == torch.float16
    array = weight.float().numpy().astype(np.float16 if half else np.float32)
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    hidden = array.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", INPUT_IDS], [INPUTS_EMBEDS],
                          name="/embed_tokens/Gather")],
        "inferaligner_embed",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info(INPUTS_EMBEDS, elem, ["batch_size", "sequence_length", hidden])],
        initializer=[numpy_helper.from_array(array, "embed_tokens.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="inferaligner-edge")
    onnx.checker.check_model(model)
    large = array.nbytes > 1_800_000_000
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + "_data" if large else None)


def to_inputs_embeds(ir_model, hidden_size: int) -> None:
    """Replaces the token embedding (the ``Gather`` fed by ``input_ids``) by a graph input ``inputs_embeds``."""
    graph = ir_model.graph
    inputs = [v.name for v in graph.inputs]
    if INPUTS_EMBEDS in inputs:
        return
    ids = graph.inputs[inputs.index(INPUT_IDS)]
    embedded = embedding_value(graph)
    gather = embedded.producer()
    new = ir.Value(name=INPUTS_EMBEDS, type=ir.TensorType(_dtype(embedded) or ir.DataType.FLOAT),
                   shape=ir.Shape([ids.shape[0] if ids.shape else "batch_size",
                                   ids.shape[1] if ids.shape else "sequence_length", hidden_size]))
    embedded.replace_all_uses_with(new, replace_graph_outputs=True)
    source, weight = gather.inputs[1], gather.inputs[0]
    graph.remove(gather, safe=True)
    # Casts or reshapes between input_ids and the Gather go too, once nothing else reads them.
    while source is not None and source.producer() is not None and not source.uses():
        node = source.producer()
        source = node.inputs[0]
        graph.remove(node, safe=True)
    if ids.uses():
        raise AlignerError(f"the language model graph uses {INPUT_IDS} beyond the token embedding; cannot feed "
                           f"{INPUTS_EMBEDS}")
    graph.inputs[inputs.index(INPUT_IDS)] = new
    if weight is not None and not weight.uses() and weight.name in graph.initializers:
        del graph.initializers[weight.name]


def image_token_of(tokenizer, vlm) -> tuple[str, int]:
    processor = getattr(tokenizer, "inferaligner_processor", None)
    token = getattr(processor, "image_token", None) or "<image>"
    token_id = getattr(vlm.config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(vlm.config, "image_token_index", None)
    if token_id is None or tokenizer.convert_tokens_to_ids(token) != token_id:
        raise AlignerError(f"the processor's image token {token!r} (id {tokenizer.convert_tokens_to_ids(token)}) "
                           f"does not match the model's image_token_id {token_id}")
    return token, int(token_id)


def image_spec_of(tokenizer):
    """:class:`ImageSpec` (LLaVA) or :class:`AnyResSpec` (LLaVA-NeXT) of the model's image processor."""
    processor = getattr(tokenizer, "inferaligner_processor", None)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise AlignerError("the vision-language model has no image processor (preprocessor_config.json)")
    return spec_from_processor_config(image_processor.to_dict())


def placement_of(template: str, image_token: str, special_tokens: dict) -> str:
    """``template`` when the chat template writes the image token for an image part, ``prompt`` when the user must
    write it in the prompt text (LLaVA-1.5's ``USER: <image>\\n...`` convention)."""
    text = render_chat(template, "probe", special_tokens, parts=True, images=1)
    return "template" if image_token in text else "prompt"


def multimodal_manifest(vlm, tokenizer, template: str, features_per_image: int, spec) -> dict:
    token, token_id = image_token_of(tokenizer, vlm)
    processor = tokenizer.inferaligner_processor
    cfg = vlm.config
    if is_anyres(spec):  # LLaVA-NeXT: the token count depends on each image's size
        anyres = _anyres_facts(cfg, processor, spec, features_per_image)
    else:
        anyres = None
        _check_image_seq_length(processor, spec, features_per_image)
    special = {k: getattr(tokenizer, k) for k in SPECIAL_TOKEN_KEYS if isinstance(getattr(tokenizer, k, None), str)}
    return {
        "architecture": cfg.model_type,
        "vision_model": VISION_FILE,
        "embed_model": EMBED_FILE,
        "image_token": token,
        "image_token_id": token_id,
        "image_seq_length": None if anyres else int(features_per_image),
        "anyres": anyres,
        "placement": placement_of(template, token, special),
        "content_format": "parts",
        "preprocessing": spec.to_manifest(),
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_io": {"inputs": ["pixel_values"], "outputs": [IMAGE_FEATURES]},
        "embed_io": {"inputs": [INPUT_IDS], "outputs": [INPUTS_EMBEDS]},
    }


def _anyres_facts(cfg, processor, spec, features_per_tile: int) -> dict:
    """The manifest's ``anyres`` object, after checking that processor and model agree on tiles and counts."""
    if cfg.vision_feature_select_strategy != "default":
            raise AlignerError(f"LLaVA-NeXT with vision_feature_select_strategy "
                               f"'{cfg.vision_feature_select_strategy}' is not supported (only 'default')")
    vision_size, patch = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size)
    if tuple(spec.tile_size) != (vision_size, vision_size):
        raise AlignerError(f"the image processor's tiles are {spec.tile_size} but the vision tower takes "
                           f"{vision_size}x{vision_size}")
    if [list(p) for p in spec.grid_pinpoints] != [list(p) for p in cfg.image_grid_pinpoints]:
        raise AlignerError("the image processor's and the model's image_grid_pinpoints differ")
    if (vision_size // patch) ** 2 != features_per_tile:
        raise AlignerError(f"the vision tower gives {features_per_tile} features per tile, expected "
                           f"{(vision_size // patch) ** 2} ({vision_size}/{patch} squared)")
    processor_patch = getattr(processor, "patch_size", None)
    if processor_patch not in (None, patch):
        raise AlignerError(f"the processor's patch_size {processor_patch} differs from the vision tower's {patch}")
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if extra != 1:
        # The CLIP tower has a CLS token: with any other value the processor's expansion (LlavaNextProcessor
        # counts patches + num_additional_image_tokens, minus 1 for "default") misses the model's features.
        raise AlignerError(f"the processor's num_additional_image_tokens is {extra}; with a CLS vision tower the "
                           f"image token count only matches the model's features with 1")
    return {"vision_image_size": vision_size, "patch_size": patch, "strategy": cfg.vision_feature_select_strategy,
            "features_per_tile": features_per_tile, "num_additional_image_tokens": extra}


def _check_image_seq_length(processor, spec, features_per_image: int) -> None:
    """LLaVA: the processor must expand the image token to as many tokens as the vision tower gives features."""
    expected = getattr(processor, "image_seq_length", None)
    patch = getattr(processor, "patch_size", None)
    if patch:
        height, width = spec.output_size
        extra = getattr(processor, "num_additional_image_tokens", 0) or 0
        expected = (height // patch) * (width // patch) + extra - \
            (1 if getattr(processor, "vision_feature_select_strategy", "default") == "default" else 0)
    if expected is not None and int(expected) != features_per_image:
        raise AlignerError(f"the processor expands the image token to {expected} tokens but the vision tower gives "
                           f"{features_per_image} features per image")


def write_graphs(vlm, out_dir: Path, spec, opset: int) -> int:
    """Writes ``vision.onnx`` and ``embed.onnx`` into ``out_dir``; returns the number of features per image."""
    export_vision(vlm, out_dir / VISION_FILE, vision_input_size(spec), opset)
    export_embed(vlm, out_dir / EMBED_FILE)
    probe = np.zeros((1, 3, *vision_input_size(spec)), np.float32)
    features = ort_session(out_dir / VISION_FILE).run([IMAGE_FEATURES], {"pixel_values": probe})[0]
    return int(features.shape[1])


# --- validation against the PyTorch model with hooks ---------------------------------------------------------------

def validation_images(spec, count: int = 2, seed: int = 7) -> list[np.ndarray]:
    """Deterministic test images of a size other than the model's, so resizing and cropping are exercised."""
    rng = np.random.default_rng(seed)
    height, width = vision_input_size(spec)
    anyres = is_anyres(spec)
    images = []
    for i in range(count):
        h, w = height + 11 * (i + 1), width + 5 * (2 - i)
        if anyres:  # a wide and a tall image: different tile grids, unpadding of rows and of columns
            h, w = (height + 11, 2 * width + 5) if i % 2 == 0 else (2 * height + 3, width + 10)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w)], -1)
        noise = rng.integers(0, 64, size=(h, w, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def validate_multimodal(out_dir: Path, vlm, tokenizer, spec, manifest_mm: dict, dtype: str, prompts,
                        decode_steps: int = 3):
    """ONNX Runtime (three graphs) against ``vlm`` with the reference hooks, for a batch of two prompts that each
    carry an image, left-padded: prefill with the images, then ``decode_steps`` decode steps, with a harmful-gated
    and a harmless-gated row (forced when the natural gates agree). Inputs come from the HF processor; the runtime's
    own prompt encoding and preprocessing are compared with the processor in the tests."""
    # deferred: torch, only when a vision-language model is exported
    import torch

    processor = tokenizer.inferaligner_processor
    token = manifest_mm["image_token"]
    template = tokenizer.chat_template
    texts = []
    for prompt in prompts:
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        if manifest_mm["placement"] == "prompt":
            content = [{"type": "text", "text": f"{token}\n{prompt}"}]
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                   add_generation_prompt=True, tokenize=False))
    for tok in (tokenizer, processor.tokenizer):  # the processor holds its own tokenizer object
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    batch = processor(text=texts, images=validation_images(spec, len(texts)), return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=False)
    pixel_values = batch["pixel_values"].float()
    ids = batch[INPUT_IDS].numpy()
    ref_kwargs = {"pixel_values": pixel_values.to(vlm.dtype)}

    vision = ort_session(out_dir / VISION_FILE)
    embed = ort_session(out_dir / EMBED_FILE)
    with torch.no_grad():
        ref_embeds = vlm.get_input_embeddings()(batch[INPUT_IDS]).float().numpy()
        if "image_sizes" in batch:  # LLaVA-NeXT: per image, its base view and tiles, packed with the newline
            sizes = batch["image_sizes"]
            ref_kwargs["image_sizes"] = sizes
            reference = [f.float().numpy() for f in vlm.model.get_image_features(ref_kwargs["pixel_values"], sizes)]
            newline = vision.run(["image_newline"], {"pixel_values": pixel_values[0, :1].numpy()})[0]
            features = []
            for b, (height, width) in enumerate(sizes.tolist()):
                count = spec.num_tiles(height, width)
                tiles = vision.run([IMAGE_FEATURES], {"pixel_values": pixel_values[b, :count].numpy()})[0]
                features.append(pack_anyres_features(tiles, (height, width), spec.grid_shape(height, width),
                                                     newline))
            vision_diff = max(float(np.abs(f.astype(np.float64) - r).max()) if f.shape == r.shape else float("inf")
                              for f, r in zip(features, reference))
        else:
            features = vision.run([IMAGE_FEATURES], {"pixel_values": pixel_values.numpy()})[0]
            reference = torch.stack(list(vlm.model.get_image_features(ref_kwargs["pixel_values"])), 0).float()
            vision_diff = float(np.abs(features.astype(np.float64) - reference.numpy()).max())
    embeds = embed.run(None, {INPUT_IDS: ids})[0]
    embed_diff = float(np.abs(embeds.astype(np.float64) - ref_embeds).max())
    merged = merge_image_features(ids, embeds, features, manifest_mm["image_token_id"])

    def embedder(input_ids, prefill: bool):
        return merged if prefill else embed.run(None, {INPUT_IDS: np.asarray(input_ids, np.int64)})[0]

    return batch, ref_kwargs, embedder, {"vision_max_abs_diff": vision_diff, "embed_max_abs_diff": embed_diff}


def validate_vlm(out_dir: Path, vlm, tokenizer, config, image_spec, manifest_mm: dict, dtype: str = "fp32",
                 prompts=None, decode_steps: int = 3, level: str = "all"):
    """The three graphs of a vision-language export against ``vlm`` with the reference hooks (see
    :func:`validate_multimodal`): prefill with an image per row, then decode steps, with
    a harmful-gated and a harmless-gated row. Raises :class:`AlignerError` above the tolerance."""
    prompts = PROMPTS if prompts is None else prompts
    batch, ref_kwargs, embedder, graph_diffs = validate_multimodal(out_dir, vlm, tokenizer, image_spec,
                                                                   manifest_mm, dtype, prompts)
    rounds = run_rounds(ort_session(out_dir / MODEL_FILE, level), vlm, batch, config, decode_steps=decode_steps,
                        embedder=embedder, ref_prefill_kwargs=ref_kwargs)
    result = check_rounds(rounds, dtype, None, " of the image prompts")
    result.rounds.append({"graphs": graph_diffs})
    for name, diff in graph_diffs.items():
        if not diff <= result.tolerance:
            raise AlignerError(f"validation failed: {name.replace('_max_abs_diff', '')} graph differs from PyTorch "
                               f"by {diff:.3g} (tolerance {result.tolerance:.3g})")
    return result
