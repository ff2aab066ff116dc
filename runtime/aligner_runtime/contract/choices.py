"""The enumerations and numeric limits of the contract, defined once: the manifest loader checks against them, the
exporter writes them, and the CLIs take their ``choices=`` from here."""

from __future__ import annotations

# --- what an export records (docs/contract.md "Manifest") -------------------------------------------------------------
DTYPES = ("fp32", "fp16")  # activation precision of the graph
STEER_IMPLS = ("function", "inline")  # steering ops as ONNX functions, or their bodies inlined
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
QUANT_METHODS = ("rtn", "hqq")  # int4 weight quantisation
ZERO_POINTS = ("exact", "kernel")  # --quant-method hqq: float zero points corrected exactly, or folded into the kernel's uint4
GATE_PATH_BITS = (4, 8)  # int4: bits of the MatMuls (and embedding) that feed the gate
EXPORTERS = ("auto", "optimum", "torch", "genai")
BIAS_RULES = ("paper", "fpr")  # how calibration places the paper gate's bias
# The gate kinds a pack and --gate name (PACK_GATES) and the rules a gate may record (GATE_RULES) follow from the
# registered kinds: contract.steering defines them.
PACK_MODES = ("cross-model", "self")
# Where a pack's steering vectors come from (docs/calibration.md): the aligned model's refusals minus its helpful
# answers to harmless prompts, or minus the target's compliant answers to the same harmful prompts, or the paper's
# prompt activations. A pack that records none was made with "prompt".
SSV_MODES = ("response", "response-compliant", "prompt")
# SteerShift's modes (docs/contract.md "Operators"): "add" is version 1 (the paper's h + gate·v), "norm" version 2
# (the shifted state rescaled to the norm it had before the shift). The registry in .steering maps them to versions.
SHIFT_MODE_NAMES = ("add", "norm")
ALPHA_PROFILES = ("flat", "norm")  # α_l per steered layer: every layer α, or α scaled by the layer's residual norm
DEFAULT_SHIFT_MODE = "add"  # what an export or pack that records no mode was made with

# --- what a runtime offers ------------------------------------------------------------------------------------------
BACKENDS = ("onnxruntime", "tensorrt")
PROVIDERS = ("cpu", "cuda", "tensorrt")  # ONNX Runtime execution providers, by short name
PREFILL_MODES = ("alone", "together")  # the server: a joining request prefilled alone or with the others joining
ENGINE_PRECISIONS = ("fp16", "bf16", "fp32")  # TensorRT engine builds
TRITON_INSTANCE_KINDS = ("cpu", "gpu")

# --- limits (checked before anything is allocated) ------------------------------------------------------------------
MAX_MANIFEST_BYTES = 8 << 20
MAX_LAYERS = 4096
MAX_HIDDEN = 1 << 20
MAX_TOKENS = 64  # a gate's pooled prompt positions (K)
MAX_CONTEXT = 1 << 24
MAX_EOS_IDS = 64
MAX_TOKEN_ID = 1 << 31
MAX_OPSET = 1000
MAX_IO_NAMES = 10_000
STRENGTH_HALF_LIFE = (1e-3, 1e6)
END_RULE_LIMITS = {"after": (0, 4096), "slope": (0.0, 100.0)}  # docs/contract.md "Ending a steered answer"
