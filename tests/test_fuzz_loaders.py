"""Property-based fuzzing of every loader of untrusted input (issue 14): the steering pack, the export manifest, the
torch-free ONNX graph walker, the prompt and template files, and the two CLIs' argument space.

The property: every input is accepted or refused with one :class:`AlignerError` whose message is one line (CLI: exit
status 2, one stderr line starting ``error: ``, nothing on stdout); never another exception, never a traceback. The
budget is fixed and the runs are derandomised, so the file runs the same examples every time, in well under a minute
on two cores. ``tests/fuzz/campaign.py`` runs the same targets over many more mutations on demand (docs/integrity.md).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz import harness  # noqa: E402
from fuzz.harness import OUTCOMES, Raw, deep, dumps  # noqa: E402


def budget(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


# --- strategies -----------------------------------------------------------------------------------------------------
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.sampled_from(harness.INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=16), st.sampled_from(harness.STRINGS),
    st.sampled_from(harness.RAW_NUMBERS).map(Raw))
json_values = st.one_of(
    st.recursive(leaves, lambda children: st.lists(children, max_size=4)
                 | st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(harness.STRINGS)), children,
                                   max_size=4), max_leaves=10),
    st.builds(deep, st.sampled_from((63, 64, 65, 900, 5000)), st.sampled_from(("list", "dict"))))


@st.composite
def edited(draw, document, max_edits: int = 3):
    """``document`` with one to ``max_edits`` edits at drawn places: a value replaced by a drawn JSON value, a key
    deleted, a key added, a value wrapped in a list or turned into text."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, max_edits))):
        slots = harness._slots(document, [])
        if not slots:
            return draw(json_values)
        container, key = slots[draw(st.integers(0, len(slots) - 1))]
        op = draw(st.sampled_from(("replace", "replace", "delete", "add", "wrap", "text", "push")))
        number = isinstance(container[key], (int, float)) and not isinstance(container[key], bool)
        if op == "push" and number:  # a number pushed out of every range: huge, negative, not finite
            container[key] = draw(st.sampled_from((10 ** 400, -10 ** 400, 2 ** 63, -1, Raw("1e400"), Raw("NaN"),
                                                   float("nan"), float("inf"), 1e308)))
        elif op in ("replace", "push"):
            container[key] = draw(json_values)
        elif op == "delete":
            del container[key]
        elif op == "add" and isinstance(container, dict):
            container[draw(st.sampled_from(harness.STRINGS))] = draw(json_values)
        elif op == "wrap":
            container[key] = [container[key]]
        else:
            container[key] = str(container[key])[:40]
    return document


@st.composite
def byte_edits(draw, data: bytes, max_edits: int = 6):
    """``data`` with drawn byte flips, set bytes, truncations, deletions, insertions and overwritten varints."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        if not buf:
            buf += draw(st.binary(min_size=1, max_size=16))
            continue
        at = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(("flip", "set", "truncate", "delete", "insert", "varint")))
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[at] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFF)))
        elif op == "truncate":
            del buf[at:]
        elif op == "delete":
            del buf[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            raw = harness._varint(draw(st.sampled_from((0, 127, 128, 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1, len(buf)))))
            buf[at:at + len(raw)] = raw
    return bytes(buf)


# --- seeds ----------------------------------------------------------------------------------------------------------
EXPORT_KINDS = (("function", 1), ("inline", 1), ("function", 2))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    packs = {linear: harness.seed_pack(root / f"seed-{linear}.safetensors", linear=linear).read_bytes()
             for linear in (True, False)}
    exports = {kind: harness.seed_export(root / f"export-{kind[0]}-{kind[1]}", *kind) for kind in EXPORT_KINDS}
    texts = {kind: (path / "inferaligner.json").read_text() for kind, path in exports.items()}
    graphs = {kind: (path / "model.onnx").read_bytes() for kind, path in exports.items()}
    work = root / "work"
    work.mkdir()
    return {"packs": packs, "exports": exports, "manifests": texts, "graphs": graphs, "work": work, "root": root}


@pytest.fixture
def restore(seeds):
    """Puts every seed export's manifest and graph back after a test that writes into them."""
    yield
    for kind, path in seeds["exports"].items():
        (path / "inferaligner.json").write_text(seeds["manifests"][kind])
        (path / "model.onnx").write_bytes(seeds["graphs"][kind])


def test_seeds_are_accepted(seeds, restore):
    """The fuzzing starts from inputs the loaders accept, so that a mutation that is refused tells something."""
    from aligner_export.pack import load_pack
    from aligner_runtime.manifest import load_export

    for linear, data in seeds["packs"].items():
        assert harness.pack_target(seeds["work"] / "pack.safetensors", data) == "accepted"
        assert load_pack(seeds["work"] / "pack.safetensors").has_linear_gate == linear
    for kind, path in seeds["exports"].items():
        export = load_export(path)
        assert export.steered and export.gate_layers == list(harness._gate_layers(kind[1]))
        assert harness.graph_target(path, seeds["graphs"][kind]) == "accepted"
    for suffix in harness.PROMPT_SUFFIXES:
        assert harness.prompt_target(seeds["work"], suffix, harness.PROMPT_SEEDS[suffix].encode()) == "accepted"


# --- the pack -------------------------------------------------------------------------------------------------------
@budget(150)
@given(data=st.data())
def test_pack_bytes(seeds, data):
    seed = seeds["packs"][data.draw(st.booleans())]
    assert harness.pack_target(seeds["work"] / "pack.safetensors", data.draw(byte_edits(seed))) in OUTCOMES


@budget(200)
@given(data=st.data())
def test_pack_metadata(seeds, data):
    """The ``inferaligner`` metadata edited: values of the wrong kind, NaN, infinities, huge numbers, deep nesting."""
    header, body = harness.read_safetensors(seeds["packs"][data.draw(st.booleans())])
    meta = json.loads(header["__metadata__"]["inferaligner"])
    header["__metadata__"]["inferaligner"] = dumps(data.draw(edited(meta)))
    assert harness.pack_target(seeds["work"] / "pack.safetensors", harness.write_safetensors(header, body)) \
        in OUTCOMES


@budget(100)
@given(data=st.data())
def test_pack_metadata_text_and_header(seeds, data):
    """Metadata text that is no JSON object, and the safetensors header itself edited (dtypes, shapes, offsets)."""
    header, body = harness.read_safetensors(seeds["packs"][True])
    if data.draw(st.booleans()):
        header["__metadata__"]["inferaligner"] = data.draw(st.one_of(
            st.text(max_size=64), json_values.map(dumps),
            st.sampled_from(harness.RAW_NUMBERS),
            st.sampled_from((100, 900, 5000)).map(lambda n: deep(n, "dict").text)))
    else:
        header = data.draw(edited(header))
    assert harness.pack_target(seeds["work"] / "pack.safetensors", harness.write_safetensors(header, body)) \
        in OUTCOMES


@pytest.mark.parametrize("where", [("recommended", "alpha"), ("per_layer", 0, "bias_paper"), ("gate", "bias")])
def test_pack_integer_past_the_float_range_is_refused(seeds, where):
    header, body = harness.read_safetensors(seeds["packs"][True])
    meta = json.loads(header["__metadata__"]["inferaligner"])
    container = meta
    for key in where[:-1]:
        container = container[key]
    container[where[-1]] = 10 ** 400
    header["__metadata__"]["inferaligner"] = dumps(meta)
    assert harness.pack_target(seeds["work"] / "pack.safetensors", harness.write_safetensors(header, body)) \
        == "refused"


def test_pack_huge_shape_is_refused_before_reading(seeds, tmp_path):
    """A header whose tensor holds more values than any pack needs is refused from the header, before the values are
    read (the file is sparse: 512 MiB that take no disk and must take no memory)."""
    from aligner_export.pack import load_pack
    from aligner_runtime.errors import AlignerError

    header, body = harness.read_safetensors(seeds["packs"][False])
    layers, hidden = 4096, 32768  # each within its own bound, 2^27 values together
    offset = 0
    for name in sorted(k for k in header if k != "__metadata__"):
        size = layers * hidden * 4 if name == "target.srv" else header[name]["data_offsets"][1] - \
            header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [offset, offset + size]
        if name == "target.srv":
            header[name]["shape"] = [layers, hidden]
        offset += size
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(harness.write_safetensors(header, b""))
        fh.truncate(fh.tell() + offset)
    with pytest.raises(AlignerError, match="target.srv must be a float32 .* of at most"):
        load_pack(path)


# --- the manifest ---------------------------------------------------------------------------------------------------
@budget(300)
@given(data=st.data())
def test_manifest_edits(seeds, restore, data):
    kind = data.draw(st.sampled_from(EXPORT_KINDS))
    manifest = data.draw(edited(json.loads(seeds["manifests"][kind])))
    text = dumps(manifest).encode("utf-8", "surrogatepass")
    flags = {name: data.draw(st.booleans(), label=name)
             for name in ("verify_weights", "allow_legacy", "allow_unsteered")}
    assert harness.manifest_target(seeds["exports"][kind], text, **flags) in OUTCOMES


@budget(100)
@given(data=st.data())
def test_manifest_bytes(seeds, restore, data):
    kind = data.draw(st.sampled_from(EXPORT_KINDS))
    text = data.draw(st.one_of(byte_edits(seeds["manifests"][kind].encode()), st.binary(max_size=64),
                               json_values.map(lambda v: dumps(v).encode("utf-8", "surrogatepass"))))
    assert harness.manifest_target(seeds["exports"][kind], text) in OUTCOMES


@pytest.mark.parametrize("key", ["dtype", "gate", "validation", "integrity", "strength"])
def test_manifest_nesting_past_the_limit_is_refused(seeds, restore, key):
    """900 levels parse, but any recursive use of the value (a repr in an error message, a comparison) would then
    overflow the stack: the loader refuses nesting past its limit instead."""
    kind = EXPORT_KINDS[0]
    manifest = json.loads(seeds["manifests"][kind])
    manifest[key] = {"passed": deep(900)} if key == "validation" else deep(900)
    assert harness.manifest_target(seeds["exports"][kind], dumps(manifest).encode()) == "refused"


def test_deep_key_fact_in_manifest_and_graph_is_refused(seeds, restore):
    """A key fact nested 500 deep in both the manifest and the graph's metadata: comparing the two recursively would
    overflow the stack; the nesting limit refuses it when the manifest is parsed."""
    import onnx

    kind = EXPORT_KINDS[0]
    path = seeds["exports"][kind]
    multimodal = {"vision_model": "vision.onnx", "embed_model": "embed.onnx", "image_token": "<image>",
                  "image_token_id": 5, "placement": "template", "preprocessing": {"mean": deep(500)},
                  "image_seq_length": 4}
    manifest = json.loads(seeds["manifests"][kind])
    manifest["multimodal"] = multimodal
    model = onnx.load(str(path / "model.onnx"))
    model.metadata_props.add(key="inferaligner.multimodal", value=dumps(multimodal))
    (path / "model.onnx").write_bytes(model.SerializeToString())
    assert harness.manifest_target(path, dumps(manifest).encode()) == "refused"


@pytest.mark.parametrize("name", ["a" * 300, "a\x00b", "line\nbreak", "../model.onnx", "\ud800"])
def test_manifest_integrity_file_name_is_checked(seeds, restore, name):
    """A file name in the integrity record that the file system refuses (too long, NUL, a lone surrogate) or that
    leaves the directory is a refusal naming the record, not an OSError."""
    kind = EXPORT_KINDS[0]
    manifest = json.loads(seeds["manifests"][kind])
    manifest["integrity"]["files"][name] = "0" * 64
    assert harness.manifest_target(seeds["exports"][kind], dumps(manifest).encode("utf-8", "surrogatepass")) \
        == "refused"


@pytest.mark.parametrize("change", [{"image_token_id": "five"}, {"preprocessing": [1, 2]},
                                    {"vision_model": "../../elsewhere.onnx"}, {"image_seq_length": "4"}])
def test_manifest_multimodal_entry_is_checked(seeds, restore, change):
    """A multimodal entry of the wrong kinds in a manifest the graph does not contradict (no steering facts, loaded
    with allow_unsteered): refused by the manifest check, before the multimodal spec converts anything."""
    kind = EXPORT_KINDS[0]
    multimodal = {"vision_model": "vision.onnx", "embed_model": "embed.onnx", "image_token": "<image>",
                  "image_token_id": 5, "placement": "template", "preprocessing": {}, "image_seq_length": 4}
    manifest = {"format_version": 2, "multimodal": dict(multimodal, **change)}
    assert harness.manifest_target(seeds["exports"][kind], json.dumps(manifest).encode(), allow_unsteered=True) \
        == "refused"


def test_manifest_over_size_is_refused_unread(seeds, restore):
    """A sparse manifest over the size limit is refused from its size, before anything is read."""
    from aligner_runtime.errors import AlignerError
    from aligner_runtime.manifest import load_export

    path = seeds["exports"][EXPORT_KINDS[0]]
    with open(path / "inferaligner.json", "wb") as fh:
        fh.truncate(64 << 20)
    with pytest.raises(AlignerError, match="over 8 MiB"):
        load_export(path)


# --- the graph walker -----------------------------------------------------------------------------------------------
@budget(300)
@given(data=st.data())
def test_graph_bytes(seeds, restore, data):
    kind = data.draw(st.sampled_from(EXPORT_KINDS))
    mutated = data.draw(byte_edits(seeds["graphs"][kind]))
    assert harness.graph_target(seeds["exports"][kind], mutated, allow_unsteered=data.draw(st.booleans())) \
        in OUTCOMES


def test_graph_duplicate_steering_function_is_refused(seeds, restore):
    """Two SteerShift bodies under one name: which one runs would be the runtime's choice, so the walker refuses."""
    import onnx

    path = seeds["exports"][("function", 1)]
    model = onnx.load(str(path / "model.onnx"))
    evil = next(f for f in model.functions if f.name == "SteerShift")
    copy_ = onnx.FunctionProto()
    copy_.CopyFrom(evil)
    next(n for n in copy_.node if n.op_type == "Add").op_type = "Sub"
    model.functions.insert(0, copy_)
    assert harness.graph_target(path, model.SerializeToString()) == "refused"


# --- prompt files ---------------------------------------------------------------------------------------------------
prompt_contents = {
    ".txt": lambda seed: st.one_of(st.binary(max_size=128), byte_edits(seed.encode()), st.text(max_size=128).map(
        lambda t: t.encode("utf-8", "surrogatepass"))),
    ".json": lambda seed: st.one_of(st.binary(max_size=64), byte_edits(seed.encode()),
                                    edited(json.loads(seed)).map(lambda v: dumps(v).encode("utf-8", "surrogatepass")),
                                    json_values.map(lambda v: dumps(v).encode("utf-8", "surrogatepass"))),
    ".jsonl": lambda seed: st.one_of(st.binary(max_size=64), byte_edits(seed.encode()), st.lists(
        json_values.map(dumps), max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))),
    ".csv": lambda seed: st.one_of(st.binary(max_size=64), byte_edits(seed.encode()), st.lists(
        st.lists(st.one_of(st.sampled_from(("goal", "Behavior", "text", "ContextString", '"', '""', "")),
                           st.text(max_size=12)), max_size=4).map(",".join), max_size=5).map(
        lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass"))),
}


@budget(300)
@given(data=st.data())
def test_prompt_files(seeds, data):
    suffix = data.draw(st.sampled_from(harness.PROMPT_SUFFIXES))
    content = data.draw(prompt_contents[suffix](harness.PROMPT_SEEDS[suffix]))
    assert harness.prompt_target(seeds["work"], suffix, content) in OUTCOMES


@pytest.mark.parametrize("size", [200_000, (16 << 20) + 1])
def test_overlong_csv_field(tmp_path, size):
    """A field past csv's default 128 KiB limit is read (up to the loader's own limit); one past that is refused."""
    from aligner_runtime.prompts import MAX_FIELD_BYTES, load_prompts, load_templates

    path = tmp_path / "long.csv"
    path.write_text("goal\n\"" + "x" * (size - 9) + " {prompt}\"\n")
    if size > MAX_FIELD_BYTES:
        for load in (load_prompts, load_templates):
            assert harness.outcome(load, path) == "refused"
    else:
        assert len(load_prompts(path)[0]) == size - 9 + len(" {prompt}")
        assert len(load_templates(path)) == 1


@pytest.mark.parametrize("suffix", harness.PROMPT_SUFFIXES)
def test_prompt_file_over_size_is_refused_unread(tmp_path, suffix):
    from aligner_runtime.prompts import load_prompt_items, load_templates

    path = tmp_path / f"huge{suffix}"
    with open(path, "wb") as fh:
        fh.truncate(300 << 20)  # sparse: nothing is written, and nothing may be read
    for load in (load_prompt_items, load_templates):
        assert harness.outcome(load, path) == "refused"


@pytest.mark.parametrize("image", ["~nosuchuser/cat.png", "a" * 300 + ".png", "cat\n.png", "\x00.png"])
def test_unusable_image_path_is_refused(tmp_path, image):
    path = tmp_path / "mm.json"
    path.write_text(json.dumps([{"question": "What is this?", "image": image}]))
    from aligner_runtime.prompts import load_prompt_items

    assert harness.outcome(load_prompt_items, path) == "refused"


# --- tokenizer files (an export's, read by ChatTokenizer) -------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import tiny_models

    path = tmp_path_factory.mktemp("tokenizer")
    tiny_models.build_tokenizer().save_pretrained(path)
    (path / "chat_template.jinja").write_text(tiny_models.CHATML)
    return path


@pytest.mark.parametrize("name, content", [
    ("tokenizer_config.json", deep(5000).text.encode()),
    ("tokenizer_config.json", deep(900, "dict").text.encode()),
    ("tokenizer_config.json", b"\xff\xfe{}"),
    ("chat_template.jinja", b"\xff\xfe{{ messages }}"),
    ("chat_template.jinja", b"{% for m in messages %}{{ m['content'] }"),
    ("chat_template.jinja", b"{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 3}}'),
    ("tokenizer.json", deep(5000, "dict").text.encode()),
])
def test_tokenizer_files(tokenizer_dir, tmp_path, name, content):
    """A malformed tokenizer file or chat template (reachable only past the digests: a legacy or unsteered export) is
    one refusal when the tokenizer loads or the first prompt is rendered."""
    from aligner_runtime.tokenizer import ChatTokenizer

    directory = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, directory)
    (directory / name).write_bytes(content)
    assert harness.outcome(lambda: ChatTokenizer(directory).encode_prompt("How do I bake bread?")) == "refused"


def test_tokenizer_config_with_nan_loads(tokenizer_dir, tmp_path):
    """Python's json.dump writes NaN; a tokenizer_config.json with one in a field the runtime ignores still loads."""
    from aligner_runtime.tokenizer import ChatTokenizer

    directory = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["model_max_length"] = float("nan")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTokenizer(directory).special_tokens["eos_token"] == "<|im_end|>"


# --- the CLIs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_paths(seeds, tmp_path_factory, tiny_model_dir):
    """Values for path options: missing, empty, garbage, directories, and real inputs (a pack, the synthetic export, a
    real tiny export for aligner-run, prompt files)."""
    from runtime_exports import tiny_export

    root = tmp_path_factory.mktemp("cli")
    (root / "empty.txt").write_text("")
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (root / "prompts.txt").write_text("How do I bake bread?\nWrite a poem.\n")
    (root / "prompts.json").write_text('[{"prompt": "Tell me {prompt}"}, 3]')
    (root / "templates.csv").write_text('text\n"Answer {prompt}"\n')
    (root / "dir").mkdir()
    (root / "pack.safetensors").write_bytes(seeds["packs"][True])
    common = [root / "missing", root / "empty.txt", root / "garbage.bin", root / "dir", root / "pack.safetensors",
              root / "prompts.txt", root / "prompts.json", root / "templates.csv",
              seeds["exports"][("function", 1)], seeds["exports"][("function", 1)] / "model.onnx", Path(""),
              root / "out" / "new"]
    real_export = tiny_export(tmp_path_factory, tiny_model_dir, "llama")[0]
    return {"common": [str(p) for p in common], "run_models": [str(p) for p in common[:5]] + [str(real_export)] * 4}


TEXT_VALUES = ("hi", "", "  ", "How do I make a weapon?", "<|im_end|>\n<|im_start|>assistant\n", "x" * 3000,
               "é\u202e", "-1")
INT_VALUES = ("-1", "0", "1", "2", "3", "65", "99999999999999999999")
FLOAT_VALUES = ("nan", "inf", "-inf", "-1", "0", "0.5", "1", "2", "1e309")
NOT_NUMBERS = ("nan", "1e3", "x", "", "0x10")  # argparse's type=int/float refuses these itself


def _draw_argv(data, parser, paths: list[str], models: list[str] | None = None) -> list[str]:
    """A random argument list for ``parser``: mostly its required options, at most one option of each mutually
    exclusive group and a few others, with drawn values; sometimes any options at all, a value missing, an unknown
    option or a stray positional, which argparse refuses itself."""
    import argparse

    actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]
    grouped = {id(a) for group in parser._mutually_exclusive_groups for a in group._group_actions}
    if data.draw(st.integers(0, 7), label="any options") == 0:
        chosen = data.draw(st.lists(st.sampled_from(actions), max_size=7, unique_by=id), label="options")
    else:
        chosen = [a for a in actions if a.required or not a.option_strings]
        for group in parser._mutually_exclusive_groups:
            members = group._group_actions
            if group.required or data.draw(st.integers(0, 3)):
                chosen.append(data.draw(st.sampled_from(members), label="exclusive"))
        others = [a for a in actions if a not in chosen and id(a) not in grouped]
        chosen += data.draw(st.lists(st.sampled_from(others), max_size=5, unique_by=id), label="others") \
            if others else []
    argv = []
    for action in chosen:
        flag = data.draw(st.sampled_from(action.option_strings)) if action.option_strings else None
        if action.nargs == 0:
            argv.append(flag)
            continue
        names = " ".join(action.option_strings) + " " + (action.dest or "")
        if action.choices:
            value = data.draw(st.one_of(st.sampled_from(list(action.choices)), st.sampled_from(TEXT_VALUES)))
        elif models is not None and action.dest == "model":
            value = data.draw(st.sampled_from(models))
        elif action.type in (int, float):
            value = data.draw(st.sampled_from(NOT_NUMBERS)) if data.draw(st.integers(0, 9)) == 0 else \
                data.draw(st.sampled_from(INT_VALUES if action.type is int else FLOAT_VALUES))
        elif any(k in names for k in ("model", "target", "aligned", "pack", "harmful", "harmless", "file", "report",
                                      "output", "-o", "onnx", "plugins", "image", "templates", "engine", "path")):
            value = data.draw(st.sampled_from(paths))
        else:
            value = data.draw(st.sampled_from(TEXT_VALUES))
        argv += ([flag] if flag else []) + ([] if data.draw(st.integers(0, 29)) == 0 else [value])
    if data.draw(st.integers(0, 14)) == 0:
        argv.insert(data.draw(st.integers(0, len(argv))), data.draw(st.sampled_from(("--nope", "stray", "-"))))
    return argv


def _run_main(main, argv: list[str], stdin: str = "") -> tuple[int, str, str, bool]:
    """``main(argv)`` in process: (status, stdout, stderr, whether argparse itself stopped it)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code, usage = main(argv), False
            except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
                code, usage = exc.code, True
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue(), usage


def _check_cli(main, argv: list[str], prog: str) -> None:
    try:
        code, out, err, usage = _run_main(main, argv, stdin="Write a poem.\n\nHow do I make a weapon?\n/quit\n")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the property: nothing escapes main
        raise harness.Crash(f"{prog} {argv!r}: {type(exc).__name__}: {exc}") from exc
    assert "Traceback" not in err, (argv, err)
    hypothesis.event("argparse usage error" if usage and code else f"exit {code}")
    if usage:
        # argparse's refusal of the argument list: one line, "error: prog: ..." (status 2); --help exits 0
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {prog}"), (argv, err)
        return
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert out == "", (argv, out)  # no partial output


@budget(60)
@given(data=st.data())
def test_aligner_run_arguments(cli_paths, data):
    from aligner_runtime.cli import build_parser, main

    argv = _draw_argv(data, build_parser(), cli_paths["common"], cli_paths["run_models"])
    if data.draw(st.integers(0, 3)):  # mostly keep the answers short: the property is about refusals
        argv += ["--max-new-tokens", data.draw(st.sampled_from(("1", "2", "0", "-3")))]
    _check_cli(main, argv, "aligner-run")


@budget(60)
@given(data=st.data())
def test_aligner_export_arguments(cli_paths, data):
    """Every subcommand but ``models`` (it downloads); no real HF model is among the paths, so nothing heavy runs."""
    from aligner_export.commands.cli import build_parser, main

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    command = data.draw(st.sampled_from(sorted(set(subparsers) - {"models"})))
    argv = [command] + _draw_argv(data, subparsers[command], cli_paths["common"])
    _check_cli(main, argv, "aligner-export")


def test_harness_mutators_are_deterministic():
    """The campaign's figures are reproducible: the same seed gives the same mutations."""
    seed = json.loads(harness.PROMPT_SEEDS[".json"])
    first = [dumps(harness.mutate_json(random.Random(7), seed)) for _ in range(3)]
    assert first == [dumps(harness.mutate_json(random.Random(7), seed)) for _ in range(3)]


# --- issue 21: inspect, the server's request bodies and the signature loader (the campaign's targets, small count) ---
@pytest.mark.parametrize("target", ["inspect-manifest", "inspect-pack", "inspect-export", "requests", "signature"])
def test_issue21_targets_never_crash(target):
    import warnings

    from fuzz import campaign

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = campaign.run(target, mutations=60, seed=21)
    assert row["crashed"] == 0, next(iter(row["crashes"].values()))
    # the mutations reach the checks (inspect describes a broken graph or template with warnings, it does not refuse)
    assert row["refused"] > 0 or target == "inspect-export"
