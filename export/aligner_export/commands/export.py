"""``aligner-export export``: an HF model + a steering pack -> an export dir with the steering nodes baked in."""

from __future__ import annotations

import math
import re
from pathlib import Path

from aligner_runtime.contract import (PACK_GATES, EndRule, EndRuleKey, Key, Manifest, StrengthSchedule,
                                      gate_kind_named)
from aligner_runtime.contract.pack import ModelInfoKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError
from aligner_runtime.contract.choices import (ALPHA_PROFILES, BIAS_RULES, DTYPES, EXPORTERS, GATE_PATH_BITS,
                                             QUANT_METHODS, SHIFT_MODE_NAMES, STEER_IMPLS, WEIGHT_FORMATS,
                                             ZERO_POINTS)
from aligner_runtime.signing import load_private_key

from aligner_export.commands.sign import sign
from aligner_export.hf.families import family_for
from aligner_export.hf.modeling import fingerprint, load_config, load_model, model_dims
from aligner_export.pack import load_pack


def configure(parser) -> None:
    parser.add_argument("--target", required=True, help="the target HF model directory (also needed with --onnx, "
                                                         "to verify the graph against PyTorch)")
    parser.add_argument("--pack", required=True, help="steering pack from 'aligner-export calibrate'")
    parser.add_argument("-o", "--output", required=True, help="export directory to create (must not exist or be empty)")
    parser.add_argument("--steer-layers", default="auto", help="steered layers: A-B, A,B,C or auto (pack's choice)")
    parser.add_argument("--gate", choices=PACK_GATES, default=None,
                        help="linear: the pack's multi-layer gate (docs/architecture.md §5.1); pooled: that gate plus "
                             "a max over the whole prompt (SteerGate version 3, a pack calibrated for it); paper: one "
                             "direction at one layer, as in the paper (default: the pack's recommendation; paper when "
                             "--gate-layer or --bias-rule is given)")
    parser.add_argument("--gate-layer", default="auto", help="the paper gate's layer N, or auto (pack's choice)")
    parser.add_argument("--alpha", default=None, help="steering strength (default: the pack's recommendation)")
    parser.add_argument("--half-life", type=float, default=None,
                        help="decay the shift of a steered answer: decode steps per halving of alpha (default: none, "
                             "the paper's constant shift; docs/contract.md 'Strength schedule')")
    parser.add_argument("--strength-floor", type=float, default=None,
                        help="with --half-life: the share of alpha the decay never goes below (default 0)")
    parser.add_argument("--end-after", type=int, default=None,
                        help="end rule: steered answers get an end-of-sequence bonus after this many tokens "
                             "(default: the pack's recommendation; docs/contract.md 'Ending a steered answer')")
    parser.add_argument("--end-slope", type=float, default=None,
                        help="end rule: the bonus added per token after --end-after (default: the pack's)")
    parser.add_argument("--no-end-rule", action="store_true",
                        help="write no end rule: steered answers run to the token budget or the model's own end")
    parser.add_argument("--bias-rule", choices=BIAS_RULES, default=None,
                        help="gate bias: paper (minus the mean projection) or fpr (false-positive budget); "
                             "default: the pack's recommendation")
    parser.add_argument("--shift-mode", choices=SHIFT_MODE_NAMES, default=None,
                        help="how SteerShift applies the vectors: add (h + gate·v, the paper's) or norm (the sum "
                             "rescaled to the norm of h before the shift); default: the pack's recommendation, add "
                             "for packs that record none")
    parser.add_argument("--alpha-profile", choices=ALPHA_PROFILES, default=None,
                        help="strength per steered layer: flat (alpha on every layer) or norm (alpha scaled by "
                             "each layer's mean residual norm over the block's mean; the same accumulated shift); "
                             "default: the pack's recommendation, flat for packs that record none")
    parser.add_argument("--steer-impl", choices=STEER_IMPLS, default="function",
                        help="steering ops as ONNX model-local functions (default) or as plain inlined ops")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="activation precision of the graph "
                        "(default fp32; fp16 with --weights fp16); the steering math is float32 either way")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                        help="weight format: fp32/fp16 (= --dtype), or int8/int4 weight-only block-wise MatMulNBits "
                             "on the MatMuls, validated against the float graph; steering stays float32 "
                             "(default: the --dtype)")
    parser.add_argument("--block-size", type=int, default=None, help="int8/int4: quantization block along K "
                        "(default 32, as the onnxruntime-genai builder)")
    parser.add_argument("--accuracy-level", type=int, default=None, help="int8/int4: MatMulNBits accuracy_level "
                        "(default 4: int8 compute on CPU, as the builder; 0 keeps float compute)")
    parser.add_argument("--quant-method", choices=QUANT_METHODS, default=None, help="int4: rtn (default; round to "
                        "nearest, symmetric, as the onnxruntime-genai builder) or hqq (HQQ scales and float zero "
                        "points, no calibration data); int8 is always rtn")
    parser.add_argument("--gate-path-bits", type=int, choices=GATE_PATH_BITS, default=None, help="int4: bits of the "
                        "embedding and the MatMuls of layers 0..g* (what the gate reads); default 8 with rtn (the "
                        "gate then decides as the float graph's), 4 with hqq")
    parser.add_argument("--zero-points", choices=ZERO_POINTS, default=None, help="--quant-method hqq: "
                        "exact (default; HQQ's float zero points through a correction beside each MatMul, slower) "
                        "or kernel (folded into the kernel's integer zero points: no extra node, not exact)")
    parser.add_argument("--min-gate-agreement", type=float, default=0.99, help="int8/int4: least share of held-out "
                        "prompts on which the quantized gate must equal the float graph's (default 0.99)")
    parser.add_argument("--onnx", default=None, metavar="FILE", help="steer this ONNX LLM (exported elsewhere, e.g. "
                        "by optimum or the onnxruntime-genai builder) instead of exporting --target")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="base exporter: optimum-onnx, falling back to torch.onnx.export(dynamo=True) (auto); "
                             "genai: the onnxruntime-genai model builder's fused graph (GroupQueryAttention, fused "
                             "norms; run from its own venv, --genai-python)")
    parser.add_argument("--genai-python", default=None, metavar="PYTHON",
                        help="python of the venv holding onnxruntime-genai and transformers 5 (default: "
                             "$INFERALIGNER_HOME/venv-genai/bin/python; made by 'make genai-venv')")
    parser.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    parser.add_argument("--force", action="store_true", help="export even if the pack was made for another model")
    parser.add_argument("--sign", default=None, metavar="KEY",
                        help="sign the finished export with this Ed25519 private key (as 'aligner-export sign')")


def parse_layers(text: str, num_layers: int, what: str) -> list[int]:
    """``A-B`` (inclusive), ``A,B,C`` or ``N`` -> a sorted list, every layer in ``[0, num_layers)``. Bounds are checked
    on the numbers before any list is built, so ``0-300000000`` fails at once."""

    if len(str(text)) > 10_000:
        raise AlignerError(f"{what}: the layer list is too long")
    layers: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if match := re.fullmatch(r"(-?\d{1,9})(?:-(-?\d{1,9}))?", part):
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            for layer in (first, last):
                if not 0 <= layer < num_layers:
                    raise AlignerError(f"{what}: layer {layer} out of range; the model has layers "
                                       f"0-{num_layers - 1}")
            if last < first:
                raise AlignerError(f"{what}: '{part}' is an empty range (write the lower layer first)")
            layers.update(range(first, last + 1))
        elif part:
            raise AlignerError(f"{what}: cannot parse '{text[:60]}' (use A-B, A,B,C or auto)")
    return sorted(layers)


def resolve_options(args, pack, num_layers: int):
    """Options from the command line, defaulting to ``pack.recommended``; every bad value is an AlignerError."""
    # deferred: the export pipeline (onnx, onnx_ir, transformers: the export extra); the parser runs in a device install
    from aligner_export.hf.export import ExportOptions

    rec = pack.recommended
    steer_spec = ",".join(str(l) for l in rec[RecommendedKey.STEER_LAYERS]) if args.steer_layers == "auto" \
        else args.steer_layers
    steer_layers = parse_layers(steer_spec, num_layers, "--steer-layers")
    if not steer_layers:
        raise AlignerError("--steer-layers: the steered set is empty")
    try:
        alpha = float(rec[RecommendedKey.ALPHA] if args.alpha is None else args.alpha)
    except ValueError:
        raise AlignerError(f"--alpha: '{args.alpha}' is not a number") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise AlignerError(f"--alpha must be a finite number > 0, got {alpha}")
    paper_options = args.gate_layer != "auto" or args.bias_rule is not None
    # --gate-layer and --bias-rule only mean something for the paper gate: giving one asks for it.
    kind = gate_kind_named(args.gate or ("paper" if paper_options else rec.get(RecommendedKey.GATE, "paper")))
    if kind.pack_weights:  # a fitted gate reads the layers and bias calibration chose
        if paper_options:
            raise AlignerError(f"--gate-layer and --bias-rule choose the paper gate's layer and bias; the "
                               f"{kind.pack_name} gate reads the layers it was calibrated on (drop them, or pass "
                               f"--gate paper)")
        gate = pack.gate(kind.pack_name)
    else:
        if args.gate_layer == "auto":
            gate_layer = int(rec[RecommendedKey.GATE_LAYER])
        else:
            layers = parse_layers(args.gate_layer, num_layers, "--gate-layer")
            if len(layers) != 1:
                raise AlignerError(f"--gate-layer: the paper gate reads one layer, got '{args.gate_layer}'")
            gate_layer = layers[0]
        gate = pack.gate(kind.pack_name, gate_layer, args.bias_rule or rec[RecommendedKey.BIAS_RULE])
    alphas = pack.alphas(steer_layers, alpha, args.alpha_profile or pack.alpha_profile)
    steering = pack.steer_config(steer_layers, alpha, gate, steer_impl=args.steer_impl,
                                 shift_mode=args.shift_mode, alphas=alphas)
    dtype, weights = resolve_precision(args)
    if not 0.0 <= args.min_gate_agreement <= 1.0:
        raise AlignerError(f"--min-gate-agreement must be in [0, 1], got {args.min_gate_agreement}")
    strength = None
    if args.half_life is not None or args.strength_floor is not None:
        if args.half_life is None:
            raise AlignerError("--strength-floor goes with --half-life (the floor of a decaying shift)")
        if not 0.5 <= args.half_life <= 1e6:
            raise AlignerError(f"--half-life must be in [0.5, 1e6] decode steps, got {args.half_life:g}")
        floor = 0.0 if args.strength_floor is None else args.strength_floor
        if not 0.0 <= floor <= 1.0:
            raise AlignerError(f"--strength-floor must be in [0, 1], got {floor:g}")
        strength = StrengthSchedule(half_life=float(args.half_life), floor=float(floor))
    return ExportOptions(end_rule=resolve_end_rule(args, rec), steering=steering, alpha=alpha, alphas=alphas, bias_rule=gate.rule, dtype=dtype,
                         validate=not args.no_validate, onnx_file=Path(args.onnx) if args.onnx else None,
                         exporter=args.exporter, weights=weights, gate_agreement=args.min_gate_agreement,
                         genai_python=args.genai_python, strength=strength)


def _per_layer_text(facts) -> str:
    if not facts.alpha_per_layer:
        return ""
    values = facts.alpha_per_layer.values()
    return f" (per layer {min(values):.3g}-{max(values):.3g})"


def resolve_end_rule(args, rec: dict):
    """The end rule from --end-after/--end-slope/--no-end-rule over the pack's recommendation (none in packs made
    before issue 17)."""
    given = args.end_after is not None or args.end_slope is not None
    if args.no_end_rule:
        if given:
            raise AlignerError("--no-end-rule goes without --end-after and --end-slope")
        return EndRule()
    pack_rule = rec.get(RecommendedKey.END_RULE) or {}
    if not given and not pack_rule:
        return EndRule()
    after = args.end_after if args.end_after is not None else pack_rule.get(EndRuleKey.AFTER)
    slope = args.end_slope if args.end_slope is not None else pack_rule.get(EndRuleKey.SLOPE)
    if after is None or slope is None:
        raise AlignerError("this pack recommends no end rule: give both --end-after and --end-slope")
    try:
        return EndRule(after=int(after), slope=float(slope))
    except ValueError as exc:
        raise AlignerError(f"--end-after/--end-slope: {exc}") from None


def resolve_precision(args):
    """``(dtype, WeightFormat)`` from ``--dtype`` and ``--weights``: fp32/fp16 weights are the dtype itself (so
    ``--dtype fp16`` alone keeps working), int8/int4 weights run with fp32 activations unless ``--dtype fp16``."""
    # deferred: the quantizer (onnx, the export extra); the parser runs in a device install
    from aligner_export.graph.quantize import weight_format

    weights_name = getattr(args, "weights", None)
    dtype = args.dtype
    if weights_name in ("fp32", "fp16"):
        if dtype is not None and dtype != weights_name:
            raise AlignerError(f"--weights {weights_name} contradicts --dtype {dtype} (float weights are the dtype)")
        dtype = weights_name
    dtype = dtype or "fp32"
    name = weights_name or dtype
    method = getattr(args, "quant_method", None)
    zero_points, gate_path_bits = getattr(args, "zero_points", None), getattr(args, "gate_path_bits", None)
    if name in ("fp32", "fp16") and (args.block_size is not None or args.accuracy_level is not None or method
                                     or zero_points or gate_path_bits):
        raise AlignerError("--block-size, --accuracy-level, --quant-method, --zero-points and --gate-path-bits "
                           "apply to --weights int8|int4 only")
    return dtype, weight_format(name, accuracy_level=args.accuracy_level, block_size=args.block_size, method=method,
                                zero_points=zero_points, gate_path_bits=gate_path_bits)


def _check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlignerError(f"output directory exists and is not empty: {path}")
    if not path.parent.is_dir():
        raise AlignerError(f"output directory's parent does not exist: {path.parent}")


def run(args) -> int:
    target, out_dir = Path(args.target), Path(args.output)
    _check_output(out_dir)
    if args.sign:
        load_private_key(args.sign)  # a bad key fails before any work
    num_layers, hidden = model_dims(target)
    family = family_for(load_config(target))
    if family.is_multimodal and args.onnx:
        raise AlignerError("--onnx is for text-only models; a vision-language model is exported from its weights")
    pack = load_pack(args.pack)
    if (pack.num_layers, pack.hidden_size) != (num_layers, hidden):
        raise AlignerError(f"the pack was made for another model: it has {pack.num_layers} layers x {pack.hidden_size}"
                           f" hidden, {target} has {num_layers} x {hidden}")
    options = resolve_options(args, pack, num_layers)
    if options.onnx_file is not None and not options.onnx_file.is_file():
        raise AlignerError(f"--onnx: file not found: {options.onnx_file}")

    # deferred: torch, the one heavy import of an export, only once every argument has been checked
    import torch
    # deferred: the export pipeline (onnx, onnx_ir, optimum: the export extra)
    from aligner_export.hf.export import export_steered

    model, tokenizer = load_model(target)
    digest = fingerprint(model)
    expected = (pack.meta.get(PackKey.TARGET) or {}).get(ModelInfoKey.FINGERPRINT)
    if expected != digest:
        if not args.force:
            raise AlignerError(f"the pack was made for another model (pack target fingerprint {str(expected)[:12]}, "
                               f"{target} is {digest[:12]}); pass --force to export anyway")
        print(f"warning: pack fingerprint {str(expected)[:12]} != model {digest[:12]} (--force)")
    if options.dtype == "fp16":
        model = model.to(torch.float16)
    manifest = export_steered(target, pack, Path(args.pack), out_dir, options, model, tokenizer, digest)
    facts = Manifest.from_json(manifest, str(out_dir))
    print(f"wrote {out_dir}: steer_layers {list(facts.steer_layers)}, gate layers {list(facts.gate_layers)}, "
          f"alpha {facts.alpha:g}{_per_layer_text(facts)}, bias {facts.bias:.4g} ({facts.gate_rule}), shift {facts.shift_mode}, "
          f"{facts.steer_impl}, {facts.dtype}, weights {manifest[Key.WEIGHTS]['format']}")
    if args.sign:
        print(sign(out_dir, Path(args.sign)))
    return 0
