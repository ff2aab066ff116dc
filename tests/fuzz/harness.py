"""Seeds, mutators and targets of the loader fuzzing (issue 14), shared by ``tests/test_fuzz_loaders.py`` (hypothesis,
a fixed budget) and the on-demand campaign ``tests/fuzz/campaign.py`` (counts of outcomes over many mutations).

Every target writes one untrusted input, calls the loader and returns ``"accepted"`` or ``"refused"`` (an
:class:`AlignerError` with a one-line message). Anything else (another exception, a multi-line message) raises
:class:`Crash` carrying the traceback. The seeds are built here without torch: a small steering pack written by
``aligner_export.pack.save_pack``, and small steered graphs made of the exporter's own steering nodes
(``aligner_export.graph.onnx_ops``) and metadata (``aligner_export.graph.manifest``) in an export directory whose
manifest records the digests of ``aligner_runtime.integrity.compute``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import struct
import traceback
from pathlib import Path

import numpy as np

from aligner_runtime.errors import AlignerError

OUTCOMES = ("accepted", "refused")


class Crash(AssertionError):
    """A loader let something other than a one-line AlignerError escape."""


def outcome(call, *args, **kwargs) -> str:
    try:
        call(*args, **kwargs)
    except AlignerError as exc:
        message = str(exc)
        if "\n" in message or "\r" in message:
            raise Crash(f"AlignerError with a multi-line message: {message[:300]!r}") from None
        return "refused"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the property under test: nothing else may escape
        raise Crash(f"{type(exc).__name__} escaped {getattr(call, '__qualname__', call)}:\n"
                    f"{''.join(traceback.format_exception(exc))[-3000:]}") from None
    return "accepted"


# --- JSON values of the wrong kind ----------------------------------------------------------------------------------
class Raw:
    """JSON text put verbatim into a document (huge integers, NaN literals, nesting deeper than ``json`` can write)."""

    def __init__(self, text: str):
        self.text = text


def dumps(value) -> str:
    """``json.dumps`` that writes :class:`Raw` pieces verbatim and NaN/Infinity as the literals Python emits."""
    raws: list[str] = []

    def replace(obj):
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(obj, dict):
            return {k: replace(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [replace(v) for v in obj]
        return obj

    text = json.dumps(replace(value), allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text


def deep(depth: int, kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


INTS = (0, 1, -1, 2, 3, 4, 7, 63, 64, 65, 4095, 4096, 2 ** 31 - 1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63,
        2 ** 64, -2 ** 63 - 1, 10 ** 30, 10 ** 400)
FLOATS = (float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0, 0.5, -4.0, 1e-9)
RAW_NUMBERS = ("1e400", "-1e400", "1" + "0" * 5000, "NaN", "Infinity", "-Infinity", "1.5e-400", "00", "0x10")
STRINGS = ("", "a", "\x00", "\n", "line\nbreak", "\ud800", "\u202e", "é" * 3, "x" * 5000, "a" * 300, "../x",
           "/etc/passwd", "~nosuchuser/x.png", "~", "file://~nosuchuser/a.png", "http://example.com/a.png",
           "model.onnx", "inferaligner.json", "model.onnx_data", "tokenizer.json", "fp32", "fp16", "function",
           "inline", "paper", "fpr", "linear", "self", "cross-model", "decoder_layer_output", "steer_gate_in",
           "{prompt}", "[INSERT PROMPT HERE]", "<|im_end|>", "0" * 64, "f" * 64, "F" * 64)


def random_string(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(STRINGS)
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x110000)))) if rng.random() < 0.9
                   else chr(rng.randrange(0xD800, 0xE000)) for _ in range(rng.randrange(0, 12)))


def random_json(rng: random.Random, depth: int = 0):
    """A JSON value, often of a kind no loader expects."""
    kind = rng.randrange(12 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTS)
    if kind == 3:
        return rng.choice(FLOATS)
    if kind == 4:
        return random_string(rng)
    if kind == 5:
        return Raw(rng.choice(RAW_NUMBERS))
    if kind == 6:
        return rng.randrange(-3, 10)
    if kind == 7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 8:
        return {random_string(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    if kind == 9:
        return deep(rng.choice((8, 64, 200, 900, 3000, 100_000)), rng.choice(("list", "dict")))
    if kind == 10:
        return [rng.choice(INTS + FLOATS)] * rng.choice((1, 5, 5000, 200_000))
    return rng.uniform(-1e6, 1e6)


def _slots(obj, out: list) -> list:
    """Every ``(container, key)`` of a JSON document (dict keys and list indices), depth first."""
    if isinstance(obj, dict):
        for key in list(obj):
            out.append((obj, key))
            _slots(obj[key], out)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            out.append((obj, i))
            _slots(obj[i], out)
    return out


def _pushed(rng: random.Random, value):
    """A number near or far past the range of ``value``."""
    choice = rng.randrange(8)
    if choice < 3:
        return (-value, value + 1, value - 1)[choice]
    if choice == 3:
        return float("nan")
    if choice == 4:
        return 10 ** 400
    if choice == 5:
        return Raw("1e400")
    try:
        return value * 1e300 if choice == 6 else float(value) if isinstance(value, int) else int(value)
    except (OverflowError, ValueError):
        return Raw("-1e400")


def mutate_json(rng: random.Random, document):
    """A copy of ``document`` with one to three structural edits: a value replaced by one of another kind, a key
    deleted or added, a value wrapped, a number pushed out of range, a subtree copied elsewhere."""
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        slots = _slots(document, [])
        if not slots or rng.random() < 0.03:
            return random_json(rng)
        container, key = rng.choice(slots)
        op = rng.randrange(7)
        if op == 0:
            container[key] = random_json(rng)
        elif op == 1:
            del container[key]
        elif op == 2 and isinstance(container, dict):
            container[rng.choice((random_string(rng), *list(container)))] = random_json(rng)
        elif op == 3:
            container[key] = rng.choice((lambda v: [v], lambda v: {"value": v}, lambda v: str(v)[:50],
                                         lambda v: deep(rng.choice((64, 900, 3000)))))(container[key])
        elif op == 4 and isinstance(container[key], (int, float)) and not isinstance(container[key], bool):
            container[key] = _pushed(rng, container[key])
        else:
            donor_container, donor_key = rng.choice(slots)
            container[key] = copy.deepcopy(donor_container[donor_key])
    return document


# --- bytes ----------------------------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mutate_bytes(rng: random.Random, data: bytes, max_edits: int = 6) -> bytes:
    """Byte flips, interesting values, truncation, deletion, duplication, insertion, overwritten varints and
    little-endian sizes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_edits)):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 16))
            continue
        p = rng.randrange(len(buf))
        op = rng.randrange(10)
        if op == 0:
            buf[p] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[p] = rng.randrange(256)
        elif op == 2:
            buf[p] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        elif op == 3:
            del buf[rng.randrange(len(buf)):]
        elif op == 4:
            del buf[p:p + rng.randint(1, 64)]
        elif op == 5:
            q = rng.randrange(len(buf))
            buf[p:p] = buf[q:q + rng.randint(1, 64)]
        elif op == 6:
            buf[p:p] = rng.randbytes(rng.randint(1, 16))
        elif op == 7:
            raw = _varint(rng.choice((0, 1, 127, 128, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 64 - 1, len(buf) + 1)))
            buf[p:p + len(raw)] = raw
        elif op == 8:
            buf[p:p + 8] = struct.pack("<Q", rng.choice((0, 1, 2 ** 31, 2 ** 63, 2 ** 64 - 1, len(buf))))
        else:
            buf[p:p + 4] = struct.pack("<f", rng.choice((float("nan"), float("inf"), -1e38, 0.0)))
    return bytes(buf)


# --- the pack -------------------------------------------------------------------------------------------------------
PACK_LAYERS, PACK_HIDDEN = 4, 8


def seed_pack(path: Path, linear: bool = True, seed: int = 0) -> Path:
    """A valid format-2 steering pack of a 4-layer, hidden-8 model, written by ``save_pack``."""
    from aligner_export.pack import SteeringPack, save_pack

    rng = np.random.default_rng(seed)
    L, H = PACK_LAYERS, PACK_HIDDEN

    def unit(shape):
        x = rng.normal(size=shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    meta = {
        "mode": "self", "site": "decoder_layer_output", "token": "last_prompt_token",
        "target": {"fingerprint": "ab" * 32, "source": "synthetic", "chat_template_sha256": "cd" * 32},
        "aligned": {"fingerprint": "ab" * 32, "source": "synthetic", "chat_template_sha256": "cd" * 32},
        "prompts": {k: {"count": 8, "sha256": "ef" * 32, "val_indices": [0, 1]} for k in ("harmful", "harmless")},
        "per_layer": [{"layer": l, "target_val_accuracy": 0.9, "aligned_val_accuracy": 0.9, "bias_paper": -0.5,
                       "bias_fpr": -0.25, "val_tpr": 0.8, "val_fpr": 0.0} for l in range(L)],
        "recommended": {"gate_layer": 2, "steer_layers": [0, 1, 2, 3], "alpha": 4.0, "bias_rule": "paper",
                        "gate": "linear" if linear else "paper"},
        "created_by": "inferaligner-edge fuzz seed",
    }
    if linear:
        meta["gate"] = {"version": 2, "layers": [1, 3], "tokens": 2, "normalize": True, "bias": -1.5,
                        "fit": "logistic-l2", "C": 1.0}
    pack = SteeringPack(unit((L, H)), rng.normal(size=(L, H)).astype(np.float32),
                        rng.normal(size=(L, H)).astype(np.float32), unit((L, H)), meta,
                        rng.normal(size=(2, H)).astype(np.float32) if linear else None)
    return save_pack(pack, path)


def read_safetensors(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def write_safetensors(header, body: bytes) -> bytes:
    text = (dumps(header) if not isinstance(header, (bytes, str)) else header)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_pack(rng: random.Random, seed: bytes) -> bytes:
    """One mutated pack file: its bytes, its safetensors header, its ``inferaligner`` metadata (as JSON values or as
    text), or its tensors' values and shapes."""
    header, body = read_safetensors(seed)
    meta = json.loads(header["__metadata__"]["inferaligner"])
    mode = rng.randrange(6)
    if mode == 0:
        return mutate_bytes(rng, seed)
    if mode == 1:  # the safetensors header (dtype, shape, offsets, metadata kinds)
        return write_safetensors(mutate_json(rng, header), body)
    if mode in (2, 3):  # the inferaligner metadata
        header = copy.deepcopy(header)
        header["__metadata__"]["inferaligner"] = dumps(mutate_json(rng, meta))
        return write_safetensors(header, body)
    if mode == 4:  # metadata text that is not a JSON object of the right shape at all
        text = rng.choice((dumps(random_json(rng)), deep(rng.choice((100, 900, 5000))).text,
                           dumps(meta).replace("-0.5", rng.choice(RAW_NUMBERS), 1),
                           mutate_bytes(rng, dumps(meta).encode()).decode("utf-8", "replace")))
        header = copy.deepcopy(header)
        header["__metadata__"]["inferaligner"] = text
        return write_safetensors(header, body)
    # tensor values (NaN, inf) or a body of another length
    body = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        p = rng.randrange(0, len(body) - 4, 4)
        body[p:p + 4] = struct.pack("<f", rng.choice((float("nan"), float("inf"), 1e38, 0.0)))
    if rng.random() < 0.3:
        body = body[:rng.randrange(len(body))] if rng.random() < 0.5 else body + rng.randbytes(rng.randint(1, 64))
    return write_safetensors(header, bytes(body))


def pack_target(path: Path, data: bytes) -> str:
    from aligner_export.pack import load_pack

    path.write_bytes(data)
    return outcome(load_pack, path)


# --- small steered graphs and an export directory ---------------------------------------------------------------------
GRAPH_LAYERS, GRAPH_HIDDEN = 4, 8
STEER_LAYERS = (0, 1, 2, 3)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _gate_layers(gate_version: int) -> tuple[int, ...]:
    return (2,) if gate_version == 1 else (1, 2)


def steered_model(impl: str = "function", gate_version: int = 1, manifest: dict | None = None, seed: int = 0):
    """An ``onnx.ModelProto`` with the steering of a 4-layer, hidden-8 model placed as the exporter places it
    (docs/contract.md): SteerShift on layers 0-3, a v1 gate on layer 2 or a v2 chain on layers 1 and 2, the clamped
    ``steer_gate_in`` below g*, every consumer of a shifted residual rewired; as functions or inlined."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from aligner_export.graph import onnx_ops
    from aligner_export.graph.manifest import set_metadata
    from aligner_runtime.contract import (GATE_IN, GATE_OUT, SCORE_OUT, STEER_GATE, STEER_PREFIX, STEER_SHIFT,
                                          node_name)

    rng = np.random.default_rng(seed)
    H, opset = GRAPH_HIDDEN, 18
    gate_layers = _gate_layers(gate_version)
    g_star = gate_layers[-1]

    def steer(node):
        return onnx_ops.inline_nodes(node, opset) if impl == "inline" and node.domain == onnx_ops.DOMAIN else [node]

    clamped = STEER_PREFIX + "gate_in_clamped"
    nodes = [helper.make_node("Constant", [], [STEER_PREFIX + "zero"], name=STEER_PREFIX + "Constant",
                              value=numpy_helper.from_array(np.array(0.0, np.float32))),
             helper.make_node("Max", [GATE_IN, STEER_PREFIX + "zero"], [clamped], name=STEER_PREFIX + "Max")]
    score_in = None
    if gate_version == 2:
        score_in = STEER_PREFIX + "score_zero"
        nodes += [helper.make_node("Shape", [GATE_IN], [STEER_PREFIX + "batch_shape"], name=STEER_PREFIX + "Shape"),
                  helper.make_node("ConstantOfShape", [STEER_PREFIX + "batch_shape"], [score_in],
                                   name=STEER_PREFIX + "ConstantOfShape",
                                   value=numpy_helper.from_array(np.zeros(1, np.float32)))]
    current = "hidden"
    for layer in range(GRAPH_LAYERS):
        residual = f"/model/layers.{layer}/Add_1_output_0"
        nodes.append(helper.make_node("Add", [current, current], [residual], name=f"/model/layers.{layer}/Add_1"))
        if layer in gate_layers:
            name = node_name(layer, STEER_GATE)
            last = layer == g_star
            outs = (GATE_OUT, SCORE_OUT) if last else (f"{name}_gate", f"{name}_score")
            weight = rng.normal(size=H).astype(np.float32)
            if gate_version == 1:
                node = onnx_ops.make_steer_gate_node(residual, "attention_mask", GATE_IN, *outs,
                                                     weight / np.linalg.norm(weight), 0.25, name)
            else:
                node = onnx_ops.make_steer_gate_v2_node(residual, "attention_mask", GATE_IN, score_in, *outs, weight,
                                                        0.25 if last else 0.0, 2, True, name)
                score_in = outs[1]
            nodes += steer(node)
        shifted = f"{node_name(layer, STEER_SHIFT)}_output_0"
        nodes += steer(onnx_ops.make_steer_shift_node(
            residual, GATE_OUT if layer >= g_star else clamped, shifted,
            4.0 * rng.normal(size=H).astype(np.float32), node_name(layer, STEER_SHIFT)))
        current = shifted
    nodes.append(helper.make_node("Identity", [current], ["logits"], name="/lm_head/Identity"))
    graph = helper.make_graph(
        nodes, "fuzz-seed",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "S", H]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info(GATE_IN, TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", H]),
         helper.make_tensor_value_info(GATE_OUT, TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info(SCORE_OUT, TensorProto.FLOAT, ["B"])])
    imports = [helper.make_opsetid("", opset)]
    functions = []
    if impl == "function":
        imports.append(helper.make_opsetid(onnx_ops.DOMAIN, gate_version))
        functions = onnx_ops.function_protos(opset, gate_version)
    model = helper.make_model(graph, opset_imports=imports, functions=functions, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    if manifest is not None:
        set_metadata(model, manifest)
    return model


def seed_manifest(impl: str, gate_version: int, format_version: int = 2) -> dict:
    """A manifest of ``format_version`` 2 (the gate's last layer, bias and rule also at the top level, as exports
    before issue 19 wrote them) or 3 (only in ``gate``)."""
    from aligner_runtime.contract import GATE_DUPLICATES, SITE, STEERING_IO, two_pass_prefill

    gate_layers = list(_gate_layers(gate_version))
    gate = {"version": gate_version, "layers": gate_layers, "tokens": 1 if gate_version == 1 else 2,
            "normalize": gate_version == 2, "bias": 0.25, "rule": "paper" if gate_version == 1 else "linear"}
    manifest = {
        "format_version": 2, "package_version": "0.1.0", "pack_sha256": "12" * 32, "pack_mode": "self",
        "target_fingerprint": "ab" * 32, "steer_layers": list(STEER_LAYERS), "gate_layer": gate_layers[-1],
        "alpha": 4.0, "bias": 0.25, "bias_rule": "paper" if gate_version == 1 else "fpr", "steer_impl": impl,
        "gate": gate, "two_pass_prefill": two_pass_prefill(STEER_LAYERS, gate_layers),
        "steering_io": dict(STEERING_IO), "dtype": "fp32", "opset": 18, "site": SITE, "exporter": "fuzz-seed",
        "chat_template_sha256": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest(), "chat_template_fallback": False,
        "num_layers": GRAPH_LAYERS, "hidden_size": GRAPH_HIDDEN, "eos_token_ids": [2], "context_length": 256,
        "io": {"inputs": ["hidden", "attention_mask", "steer_gate_in"],
               "outputs": ["logits", "steer_gate", "steer_score"]},
        "validation": {"passed": True, "prefill_max_abs_diff": 1e-6, "decode_max_abs_diff": 1e-6,
                       "tolerance": 1e-4, "gates": [1.0, 0.0]},
    }
    if format_version >= 3:
        manifest["format_version"] = format_version
        for key in GATE_DUPLICATES:
            del manifest[key]
    return manifest


def seed_export(directory: Path, impl: str = "function", gate_version: int = 1, format_version: int = 2) -> Path:
    """An export directory that ``load_export`` accepts: the steered graph, the files the integrity digests cover and a
    manifest of ``format_version`` (2 or 3) with those digests."""
    import onnx

    from aligner_runtime import integrity
    from aligner_runtime.onnx_graph import read_graph_summary

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = seed_manifest(impl, gate_version, format_version)
    onnx.save(steered_model(impl, gate_version, manifest), str(directory / "model.onnx"))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}')
    (directory / "generation_config.json").write_text('{"eos_token_id": 2}')
    manifest["integrity"] = integrity.compute(directory, read_graph_summary(directory / "model.onnx"),
                                              manifest["gate"]["layers"], manifest["steer_layers"], impl)
    (directory / "inferaligner.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def mutate_manifest(rng: random.Random, seed_text: str) -> bytes:
    mode = rng.randrange(5)
    if mode <= 2:
        return dumps(mutate_json(rng, json.loads(seed_text))).encode("utf-8", "surrogatepass")
    if mode == 3:
        return mutate_bytes(rng, seed_text.encode())
    return rng.choice((dumps(random_json(rng)).encode("utf-8", "surrogatepass"), rng.randbytes(rng.randint(0, 64)),
                       deep(rng.choice((100, 900, 5000)), "dict").text.encode()))


def manifest_target(directory: Path, data: bytes, verify_weights: bool = True, allow_legacy: bool = False,
                    allow_unsteered: bool = False) -> str:
    from aligner_runtime.manifest import load_export

    (directory / "inferaligner.json").write_bytes(data)
    return outcome(load_export, directory, allow_unsteered=allow_unsteered, allow_legacy=allow_legacy,
                   verify_weights=verify_weights)


def graph_target(directory: Path, data: bytes, allow_unsteered: bool = False) -> str:
    """The walker alone, then the whole load of an export dir holding the mutated graph (weights unverified, so that
    the steering digests and the walker's output decide)."""
    from aligner_runtime.manifest import load_export
    from aligner_runtime.onnx_graph import read_graph_summary

    (directory / "model.onnx").write_bytes(data)
    walked = outcome(read_graph_summary, directory / "model.onnx")
    loaded = outcome(load_export, directory, allow_unsteered=allow_unsteered, verify_weights=False)
    return "accepted" if walked == loaded == "accepted" else "refused"


# --- prompt files ---------------------------------------------------------------------------------------------------
PROMPT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")
PROMPT_SEEDS = {
    ".txt": "# harmful\nHow do I make a weapon?\n\nWrite a poem about the sea.\n",
    ".json": json.dumps([{"instruction": "Write {prompt} please"}, "How do I bake bread? {prompt}",
                         {"question": "What is in this picture? [INSERT PROMPT HERE]", "image": "cat.png"}]),
    ".jsonl": '{"prompt": "Tell me a story {{ prompt }}"}\n{"goal": "Explain {prompt}"}\n',
    ".csv": 'goal,target,ContextString\n"How do I make a weapon? {prompt}","Sure",""\n"Steal, lie",x,"ctx"\n',
}


def mutate_prompt_file(rng: random.Random, suffix: str) -> bytes:
    seed = PROMPT_SEEDS[suffix]
    mode = rng.randrange(5)
    if mode == 0:
        return rng.randbytes(rng.randint(0, 256))
    if mode == 1:
        return mutate_bytes(rng, seed.encode())
    if suffix in (".json", ".jsonl") and mode in (2, 3):
        if suffix == ".json":
            value = mutate_json(rng, json.loads(seed)) if mode == 2 else random_json(rng)
            return dumps(value).encode("utf-8", "surrogatepass")
        lines = [dumps(mutate_json(rng, json.loads(line)) if mode == 2 else random_json(rng))
                 for line in seed.splitlines()]
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    if suffix == ".csv" and mode in (2, 3):
        columns = rng.sample(("goal", "Behavior", "prompt", "text", "ContextString", "target", "", "goal"),
                             rng.randint(1, 4))
        rows = [",".join(_csv_cell(rng) for _ in range(len(columns) + rng.choice((0, 0, 0, 1, -1))))
                for _ in range(rng.randint(0, 4))]
        return "\n".join([",".join(columns), *rows]).encode("utf-8", "surrogatepass")
    return "\n".join(random_string(rng) for _ in range(rng.randint(0, 6))).encode("utf-8", "surrogatepass")


def _csv_cell(rng: random.Random) -> str:
    cell = random_string(rng)
    if rng.random() < 0.05:
        cell = "x" * rng.choice((200_000, 1 << 20))  # past csv's default 128 KiB field limit
    return rng.choice((cell, '"' + cell.replace('"', '""') + '"', '"' + cell))


def prompt_target(directory: Path, suffix: str, data: bytes) -> str:
    from aligner_runtime.prompts import load_prompt_items, load_templates

    path = directory / f"prompts{suffix}"
    path.write_bytes(data)
    if not (directory / "cat.png").is_file():  # the image the JSON seed names, so that the seed is accepted
        (directory / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    items = outcome(load_prompt_items, path)
    outcome(load_templates, path)  # a template file must hold a slot in every line: mostly refused, never a crash
    return items


# --- issue 21: inspect, the server's request bodies, the signature loader --------------------------------------------
def inspect_target(path: Path) -> str:
    """``aligner-export inspect``'s describe and render, without the command's last-resort guard (so that a missed
    case counts as a crash here, not as a refusal)."""
    from aligner_export.commands.inspect import describe, render

    def both():
        info = describe(path)
        text = render(info)
        text.encode("utf-8", "backslashreplace")
        json.dumps(info, default=str)
    return outcome(both)


def inspect_manifest_target(directory: Path, data: bytes) -> str:
    (directory / "inferaligner.json").write_bytes(data)
    return inspect_target(directory)


def inspect_graph_target(directory: Path, data: bytes) -> str:
    (directory / "model.onnx").write_bytes(data)
    return inspect_target(directory)


def inspect_pack_target(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return inspect_target(path)


REQUEST_SEEDS = (
    {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
     "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "seed": 3, "stream": True,
     "stream_options": {"include_usage": True}, "stop": ["\n", "END"], "n": 1, "user": "u"},
    {"model": "tiny", "prompt": "Write a poem", "max_tokens": 4, "echo": False, "suffix": "", "best_of": 1,
     "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "stop": "x"},
)


def mutate_request(rng: random.Random) -> bytes:
    seed = rng.choice(REQUEST_SEEDS)
    mode = rng.randrange(6)
    if mode <= 2:
        return dumps(mutate_json(rng, seed)).encode("utf-8", "surrogatepass")
    if mode == 3:
        return mutate_bytes(rng, json.dumps(seed).encode())
    if mode == 4:  # a field nested deep, or a huge integer, where the parser reads a number
        key = rng.choice(("max_tokens", "temperature", "stop", "messages", "prompt", "seed", "model"))
        value = rng.choice((deep(rng.choice((100, 5000, 50_000)), rng.choice(("list", "dict"))),
                            Raw("1" + "0" * rng.choice((400, 4300, 5000))), Raw("-1e400")))
        return dumps({**seed, key: value}).encode("utf-8", "surrogatepass")
    return rng.choice((dumps(random_json(rng)).encode("utf-8", "surrogatepass"), rng.randbytes(rng.randint(0, 64)),
                       deep(rng.choice((1000, 100_000)), rng.choice(("list", "dict"))).text.encode()))


def request_target(data: bytes, context_length: int = 256) -> str:
    """What the server does with a body before the tokenizer: ``schema.loads`` (as ``http._read_json``), the chat or
    completion parser, the model-name check, and the error object Starlette serialises (``ensure_ascii=False``,
    UTF-8). A :class:`BadRequest` is an AlignerError: a refusal; anything else would be a 500."""
    from aligner_runtime import schema
    from aligner_runtime.serving.requests import BadRequest, _shown, parse_chat, parse_completion

    def serve():
        try:
            body = schema.loads(data, "the request body")
            kind = "completion" if isinstance(body, dict) and "prompt" in body else "chat"
            generation = parse_chat(body, context_length) if kind == "chat" else parse_completion(body, context_length)
            if "model" in body and body["model"] not in (None, "tiny"):
                raise BadRequest(f"the model {_shown(body['model'])} does not exist here", "model", status=404)
            generation.prompt.encode("utf-8")
        except AlignerError as exc:
            param = getattr(exc, "param", None)
            json.dumps({"error": {"message": str(exc), "param": param}}, ensure_ascii=False).encode("utf-8")
            raise
    return outcome(serve)


def seed_signature(directory: Path, key_dir: Path) -> tuple[bytes, Path]:
    """A signed copy's signature file and the trusted public key."""
    from aligner_runtime import signing

    private, public, _ = signing.keygen(key_dir / "fuzz.key", force=True)
    signing.sign_export(directory, private)
    return (directory / signing.SIGNATURE_FILE).read_bytes(), public


def mutate_signature(rng: random.Random, seed: bytes) -> bytes:
    mode = rng.randrange(5)
    if mode <= 2:
        return dumps(mutate_json(rng, json.loads(seed))).encode("utf-8", "surrogatepass")
    if mode == 3:
        return mutate_bytes(rng, seed)
    return rng.choice((dumps(random_json(rng)).encode("utf-8", "surrogatepass"), rng.randbytes(rng.randint(0, 96)),
                       deep(rng.choice((100, 5000)), "dict").text.encode()))


def signature_target(directory: Path, data: bytes, public_key: Path, key_data: bytes | None = None) -> str:
    """The signature file (and, with ``key_data``, the trusted key file) mutated, checked against the trusted key as
    every load does, then by ``load_export`` itself."""
    from aligner_runtime import signing
    from aligner_runtime.manifest import load_export, manifest_sha256

    (directory / signing.SIGNATURE_FILE).write_bytes(data)
    key = public_key
    if key_data is not None:
        key = public_key.with_name("mutated.pub")
        key.write_bytes(key_data)
    checked = outcome(signing.check_export, directory, manifest_sha256(directory), trusted_keys=[key])
    loaded = outcome(load_export, directory, verify_weights=False, trusted_keys=[key])
    return "accepted" if checked == loaded == "accepted" else "refused"
