"""The steering pack's metadata keys (docs/architecture.md §4): the ``inferaligner`` JSON object of a pack's
safetensors header, written by calibration (``aligner_export.hf.calibrate``, ``aligner_export.pack.save_pack``) and
read by the exporter, ``inspect``, the calibration report and the sweep.

Some of these words are also manifest keys (``gate_layer``, ``steer_layers``, ``alpha`` ...): they name a pack's
recommendation, which the exporter turns into an export's facts, and are spelled here so that neither format borrows
the other's constants. The gate's own fields (``version``, ``layers``, ``tokens``, ``normalize``, ``bias``, ``rule``)
are :class:`.steering.GateKey`, the same in the pack and in the manifest. Names only: the checks are the pack
loader's (``aligner_export.pack.check_meta``)."""

from __future__ import annotations


class PackKey:
    """The top-level keys of a pack's metadata."""

    FORMAT_VERSION = "format_version"
    NUM_LAYERS = "num_layers"
    HIDDEN_SIZE = "hidden_size"
    SITE = "site"
    TOKEN = "token"
    MODE = "mode"
    SSV = "ssv"
    TARGET = "target"
    ALIGNED = "aligned"
    PROMPTS = "prompts"
    PER_LAYER = "per_layer"
    RECOMMENDED = "recommended"
    GATE = "gate"  # a fitted gate's record (GateKey, plus how it was fitted); with the gate.weight tensor
    MAX_FPR = "max_fpr"
    SEED = "seed"
    CREATED_BY = "created_by"


class RecommendedKey:
    """The keys of the pack's ``recommended`` object: what ``aligner-export export`` uses by default."""

    GATE = "gate"  # the pack name of the gate kind (contract.PACK_GATES, from the registered kinds)
    GATE_LAYER = "gate_layer"  # the paper gate's layer
    STEER_LAYERS = "steer_layers"
    ALPHA = "alpha"
    BIAS_RULE = "bias_rule"  # the paper gate's bias rule (contract.choices.BIAS_RULES)
    SSV = "ssv"
    SHIFT_MODE = "shift_mode"
    END_RULE = "end_rule"
    ALPHA_PROFILE = "alpha_profile"  # α per steered layer (contract.choices.ALPHA_PROFILES); absent: flat


class ModelInfoKey:
    """The keys of the pack's ``target`` and ``aligned`` objects: the model each set of vectors was read from."""

    FINGERPRINT = "fingerprint"
    SOURCE = "source"
    CHAT_TEMPLATE_SHA256 = "chat_template_sha256"
    CHAT_TEMPLATE_FALLBACK = "chat_template_fallback"
    PROMPTS = "prompts"


class LayerStatsKey:
    """The keys of each ``per_layer`` entry (one per layer, in order); the bias of rule ``r`` is ``bias_<r>``."""

    LAYER = "layer"
    TARGET_VAL_ACCURACY = "target_val_accuracy"
    ALIGNED_VAL_ACCURACY = "aligned_val_accuracy"
    VAL_TPR = "val_tpr"
    VAL_FPR = "val_fpr"
    MARGIN = "margin"
    RESIDUAL_NORM = "residual_norm"  # the mean residual norm of the calibration prompts at this layer

    @staticmethod
    def bias(rule: str) -> str:
        return f"bias_{rule}"

    @staticmethod
    def val_accuracy(rule: str) -> str:
        return f"val_accuracy_{rule}"
