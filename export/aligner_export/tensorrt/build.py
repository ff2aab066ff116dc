"""Build a TensorRT engine from an export directory with the SteerGate/SteerShift plugins (docs/architecture.md
§5, §7).

Polygraphy's loaders do the TensorRT work, each one step: ``LoadPlugins`` -> ``NetworkFromOnnxBytes`` (the graph with
the steering functions removed, so the parser must map those nodes to our plugins) -> ``CreateConfig`` (precision,
the prefill and decode ``Profile``s, aliasing) -> ``EngineBytesFromNetwork``. Between them this module checks what
Polygraphy cannot know: that the library registered our creators (``check_creators``) and that every steering node
became a plugin layer (``check_plugins_used``). ``write_engine`` writes the engine and its ``ENGINE.json`` stamp.

The stamp holds ``trt_version``, ``compute_capability``, ``manifest_sha256`` and ``engine_sha256``; the Python
TensorRT backend and the C API refuse an engine whose stamp does not match the TensorRT, the GPU, the export or the
engine file they are given. Keep one engine per directory.

``tensorrt`` is imported only here and only when a build runs: without it, ``aligner-export build`` prints one line
and exits with status 2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from aligner_runtime.contract import (ATTENTION_MASK, DOMAIN, GATE_IN, INPUTS_EMBEDS, INPUT_IDS, Key, OP_TYPES,
                                      PAST_PREFIX, PLUGIN_NAMESPACE, POSITION_IDS, STAMP_FILE, STEER_GATE, STEER_SHIFT,
                                      StampKey, parse_node_name, plugin_version, shift_mode_named)
from aligner_runtime.contract.choices import DEFAULT_SHIFT_MODE
from aligner_runtime.errors import AlignerError, atomic_path
from aligner_runtime.manifest import load_export

PRECISIONS = ("fp32", "fp16", "bf16")


def import_tensorrt():
    try:
        # deferred: tensorrt (its own extra, or JetPack's): one clear line when absent
        import tensorrt as trt
    except ImportError:
        raise AlignerError("TensorRT is not installed here (no `tensorrt` Python module): aligner-export build needs "
                           "TensorRT and an NVIDIA GPU (JetPack ships both; see docs/tensorrt.md)") from None
    return trt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


@dataclass
class Profiles:
    """Shape ranges of the two optimization profiles: 0 serves prefill (any prompt length) and, being general, every
    step; 1 is tuned for decode (one new token over a long past)."""

    max_batch: int = 1
    opt_batch: int = 1
    max_prompt: int = 512
    opt_prompt: int = 128
    max_context: int = 1024
    decode_profile: bool = True

    def check(self) -> None:
        if not (1 <= self.opt_batch <= self.max_batch):
            raise AlignerError(f"need 1 <= --opt-batch <= --max-batch, got {self.opt_batch} and {self.max_batch}")
        if not (1 <= self.opt_prompt <= self.max_prompt):
            raise AlignerError(f"need 1 <= --opt-prompt <= --max-prompt, got {self.opt_prompt} and {self.max_prompt}")
        if self.max_context < self.max_prompt:
            raise AlignerError(f"--max-context ({self.max_context}) must be at least --max-prompt ({self.max_prompt})")

    def ranges(self, name: str, shape: tuple, decode: bool) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) for one graph input, from its name (docs/architecture.md §5 graph interface)."""
        B = (1, self.opt_batch, self.max_batch)
        if decode:
            S = (1, 1, 1)
            past = (0, self.max_context // 2, self.max_context - 1)
        else:
            S = (1, self.opt_prompt, self.max_prompt)
            past = (0, 0, self.max_context - self.max_prompt)
        total = (S[0] + past[0], S[1] + past[1], S[2] + past[2])
        if name in (INPUT_IDS, POSITION_IDS):
            dims = [B, S]
        elif name == INPUTS_EMBEDS:  # a vision-language export's language model (issue 6)
            if len(shape) != 3 or not isinstance(shape[2], int) or shape[2] < 1:
                raise AlignerError(f"graph input {name} has shape {shape}; expected [batch, sequence, hidden]")
            dims = [B, S, (shape[2],) * 3]
        elif name == ATTENTION_MASK:
            dims = [B, total]
        elif name == GATE_IN:
            dims = [B]
        elif name.startswith(PAST_PREFIX):
            if len(shape) != 4:
                raise AlignerError(f"graph input {name} has shape {shape}; expected [batch, heads, past, head_dim]")
            dims = [B, (shape[1],) * 3, past, (shape[3],) * 3]
        else:
            raise AlignerError(f"graph input {name} is not part of the steered decoder interface "
                               f"(docs/architecture.md §5)")
        return tuple(tuple(d[i] for d in dims) for i in range(3))


@dataclass
class BuildReport:
    plugins_used: dict = field(default_factory=dict)
    inlined_layers: int = 0
    strongly_typed: bool = False


def required_creators(gate_version: int, shift_version: int = 1) -> list[tuple[str, str]]:
    """(op, plugin version) pairs an export with a gate of ``gate_version`` and a shift of ``shift_version`` needs."""
    return [(STEER_GATE, plugin_version(STEER_GATE, gate_version)),
            (STEER_SHIFT, plugin_version(STEER_SHIFT, shift_version=shift_version))]


def check_creators(trt, library: Path, gate_version: int, shift_version: int = 1) -> None:
    """After Polygraphy's ``LoadPlugins`` ran: the creators this export needs are registered under our namespace.
    The ``_dynamic`` variant registers nothing on load; TensorRT's own loader calls its ``getCreators()``."""
    registry = trt.get_plugin_registry()
    handle = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    if hasattr(handle, "getCreators") and registry.load_library(str(library)) is None:
        raise AlignerError(f"TensorRT could not load plugin library {library}")
    missing = [f"{op} v{version}" for op, version in required_creators(gate_version, shift_version)
               if registry.get_creator(op, version, PLUGIN_NAMESPACE) is None]
    if missing:
        raise AlignerError(f"plugin library {library} does not provide {', '.join(missing)} "
                           f"(namespace {PLUGIN_NAMESPACE}); rebuild it from this version of the package")


def plugin_model_bytes(model_path: Path) -> tuple[bytes, list[str]]:
    """The graph without the SteerGate/SteerShift model-local functions, so the ONNX parser must map those nodes to
    our plugins (any TensorRT 10.x parser; 10.3 would otherwise inline the functions). Weights stay external."""
    # deferred: polygraphy and onnx are of the [export] extra; aligner-export --help imports this module without them
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in OP_TYPES)]
    del model.functions[:]
    model.functions.extend(kept)
    nodes = [n.name for n in model.graph.node if n.domain == DOMAIN and n.op_type in OP_TYPES]
    return model.SerializeToString(), nodes


def check_plugins_used(trt, network, steering_nodes: list[str]) -> BuildReport:
    """Counts plugin layers named after the steering nodes; every steering node must have become one."""
    report = BuildReport()
    plugin_layers = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            plugin_layers.add(layer.name)
        elif any(layer.name.startswith(node + "/") for node in steering_nodes):
            report.inlined_layers += 1
    missing = [n for n in steering_nodes if n not in plugin_layers]
    if missing or report.inlined_layers:
        raise AlignerError(f"TensorRT did not use the plugins for {len(missing)} of {len(steering_nodes)} steering "
                           f"nodes (first: {missing[0] if missing else 'inlined layers'}); check the plugin library")
    for node in steering_nodes:
        op = parse_node_name(node)[1]
        report.plugins_used[op] = report.plugins_used.get(op, 0) + 1
    return report


def polygraphy_profiles(network, profiles: Profiles) -> tuple[list, list[dict]]:
    """Polygraphy ``Profile`` objects for the network's inputs (prefill, then decode) and their description."""
    # deferred: polygraphy and onnx are of the [export] extra; aligner-export --help imports this module without them
    from polygraphy.backend.trt import Profile

    built, described = [], []
    for decode in ([False, True] if profiles.decode_profile else [False]):
        profile, entry = Profile(), {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            lo, opt, hi = profiles.ranges(tensor.name, tuple(tensor.shape), decode)
            profile.add(tensor.name, min=lo, opt=opt, max=hi)
            entry[tensor.name] = [list(lo), list(opt), list(hi)]
        built.append(profile)
        described.append({"name": "decode" if decode else "prefill", "shapes": entry})
    return built, described


def compute_capability(device: int = 0) -> str:
    """major.minor of the GPU TensorRT builds for, from the CUDA runtime (no extra Python package needed)."""
    names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for name in filter(None, names):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        # cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76
        if cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, device) == 0 and \
                cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device) == 0:
            return f"{major.value}.{minor.value}"
    raise AlignerError("cannot query the GPU's compute capability (no CUDA runtime or no GPU)")


def build_engine(model_dir: Path, plugins: Path, output: Path, precision: str = "fp16",
                 profiles: Profiles | None = None, workspace_mib: int = 0, aliasing: bool = True) -> dict:
    """The whole build; returns the stamp written beside the engine."""
    trt = import_tensorrt()
    # deferred: polygraphy and onnx are of the [export] extra; aligner-export --help imports this module without them
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, LoadPlugins, NetworkFromOnnxBytes

    profiles = profiles or Profiles()
    profiles.check()
    if precision not in PRECISIONS:
        raise AlignerError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    plugins = Path(plugins)
    if not plugins.is_file():
        raise AlignerError(f"plugin library not found: {plugins} (build it with `make native TensorRT_ROOT=...`)")
    plugins = plugins.resolve()
    export = load_export(model_dir)
    manifest = export.manifest
    if manifest.get(Key.STEER_IMPL, "function") != "function":
        raise AlignerError(f"{export.path} was exported with --steer-impl {manifest.get('steer_impl')}: the "
                           "TensorRT plugins replace SteerGate/SteerShift functions only; re-export with "
                           "--steer-impl function")
    export_dtype = manifest.get(Key.DTYPE, "fp32")
    strongly_typed = trt_major(trt) >= 11 or precision == export_dtype
    if trt_major(trt) >= 11 and precision != export_dtype:
        raise AlignerError(f"TensorRT {trt.__version__} builds strongly typed networks, so the precision is the "
                           f"export's ({export_dtype}); re-export with --dtype {precision} or pass --precision "
                           f"{export_dtype}")
    blob, steering_nodes = plugin_model_bytes(export.model_path)
    if not steering_nodes:
        raise AlignerError(f"{export.model_path} has no SteerGate/SteerShift nodes")

    LoadPlugins(plugins=[str(plugins)])()
    shift_version = shift_mode_named(manifest.get(Key.SHIFT_MODE, DEFAULT_SHIFT_MODE)).version
    check_creators(trt, plugins, int((manifest.get(Key.GATE) or {}).get("version", 1)), shift_version)
    # deferred: polygraphy and onnx are of the [export] extra; aligner-export --help imports this module without them
    from polygraphy.exception import PolygraphyException

    try:  # TensorRT 11 networks are always strongly typed; on 10.x it is a network flag.
        builder, network, parser = NetworkFromOnnxBytes(blob, strongly_typed=strongly_typed and trt_major(trt) < 11)()
    except PolygraphyException as exc:
        raise AlignerError(f"TensorRT cannot parse {export.model_path}: {str(exc).splitlines()[0]}") from None
    report = check_plugins_used(trt, network, steering_nodes)
    report.strongly_typed = strongly_typed
    print("plugins used: " + ", ".join(f"{op} x{n}" for op, n in sorted(report.plugins_used.items()))
          + " (TensorRT plugin layers; no steering function was inlined)")

    built_profiles, described = polygraphy_profiles(network, profiles)
    preview = getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)
    config = CreateConfig(
        fp16=not strongly_typed and precision == "fp16", bf16=not strongly_typed and precision == "bf16",
        profiles=built_profiles,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20} if workspace_mib else None,
        # SteerShift may then run in place (getAliasedInput).
        preview_features=[preview] if aliasing and preview is not None else None)
    try:
        engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
    except PolygraphyException:
        engine = None
    if engine is None:
        raise AlignerError("TensorRT failed to build the engine (see the TensorRT messages above)")
    engine = bytes(engine)
    stamp = {
        StampKey.FORMAT_VERSION: 2,
        StampKey.TRT_VERSION: trt.__version__,
        StampKey.COMPUTE_CAPABILITY: compute_capability(),
        StampKey.MANIFEST_SHA256: export.manifest_sha256,
        StampKey.ENGINE_FILE: Path(output).name,
        StampKey.ENGINE_SHA256: hashlib.sha256(engine).hexdigest(),
        StampKey.PRECISION: precision,
        StampKey.STRONGLY_TYPED: strongly_typed,
        "plugin_library": str(plugins),
        "plugins_used": report.plugins_used,
        "profiles": described,
    }
    write_engine(Path(output), engine, stamp)
    return stamp


def write_engine(output: Path, engine: bytes, stamp: dict) -> None:
    """Engine and stamp appear together or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output.parent / STAMP_FILE, suffix=".json") as stamp_tmp:
        stamp_tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        with atomic_path(output, suffix=".engine") as engine_tmp:
            engine_tmp.write_bytes(engine)
