"""The contract of docs/architecture.md §5-§6 and docs/contract.md, defined once for the exporter and both runtimes.

Everything that more than one part of the package must agree on lives in this package, and nowhere else:

- :mod:`.names`: the operator domain, names and versions, the graph's steering and base-model I/O names (with the
  past/present cache-name helpers), the file names of an export directory and of an engine stamp, node names;
- :mod:`.protocol`: the position-ids rule of a padded batch, the two-pass rule, the prefill decision, the strength
  schedule;
- :mod:`.steering`: the registry of gate kinds and shift modes, and the one steering-configuration type
  (:class:`SteerConfig` over :class:`GateConfig`) that the calibration, the PyTorch reference, the graph rewrite and
  the validation all take;
- :mod:`.manifest`: the manifest's key names, the key facts shared with the graph's metadata, the check of every
  field and the typed :class:`Manifest`;
- :mod:`.pack`: the steering pack's metadata keys (the pack is the exporter's input; the names live here so that
  neither the pack nor the manifest borrows the other's words);
- :mod:`.choices`: enumerations (dtypes, steer impls, backends, weight formats, ...) and numeric limits, which the
  CLIs use as ``choices=``.

The C++ side has its single copy of the names in ``plugins/common/steerContract.h`` and reads the graph I/O names and
the two-pass rule from the manifest (``steering_io``, ``two_pass_prefill``); ``tests/test_contract_sync.py`` keeps
both in step with this package.

Numpy only: the runtime imports this on a device with no torch and no onnx.
"""

from __future__ import annotations

from .choices import *  # noqa: F401,F403
from .names import (ATTENTION_MASK, CHAT_TEMPLATE_FILE, DOMAIN, EMBED_FILE, GATE_DECIDE, GATE_IN, GATE_OUT,
                    INPUT_IDS, INPUTS_EMBEDS, LOGITS, MANIFEST_FILE, METADATA_PREFIX, MODEL_FILE, OP_TYPES, PAST,
                    PAST_KINDS, PAST_PREFIX, PLUGIN_ATTRIBUTES, PLUGIN_NAMESPACE, POSITION_IDS, PRESENT,
                    PRESENT_PREFIX, SCORE_OUT, SHIFT_VERSION, SITE, STAMP_FILE, STEER_GATE, STEER_PREFIX, STEER_SHIFT,
                    STEERING_IO, VISION_FILE, is_past, layer_prefix, node_name, parse_node_name, past_name,
                    plugin_version, present_name)
from .protocol import (CONSTANT_STRENGTH, NO_END_RULE, EndRule, StrengthSchedule, position_ids, prefill_decision, shift_takes_decision,
                       two_pass_prefill)
from .steering import (GATE_KINDS, GATE_RULES, PACK_GATES, SHIFT_CONSTANT, SHIFT_MODES, GateConfig, GateKey,
                       GateKind, ShiftMode, SteerConfig, gate_constants, gate_kind, gate_kind_named,
                       gate_kind_of_constants, pack_weight_versions, register_gate_kind, register_shift_mode,
                       shift_mode_named, shift_mode_of_version)
from .manifest import (FORMAT_VERSION, GATE_DUPLICATES, KEY_FACTS, LEGACY_FORMAT_VERSION, METADATA_EXTRA,
                       OLDEST_VERIFIED_FORMAT_VERSION, REQUIRED_V2, REQUIRED_V3, STEERING_FACTS, STEERING_FACTS_V3,
                       SUPPORTED_FORMAT_VERSIONS, EndRuleKey, IntegrityKey, Key, Manifest, StampKey, StrengthKey,
                       check_manifest, manifest_gate_bias, manifest_gate_layer, manifest_gate_layers,
                       manifest_gate_rule, required_keys, steering_declared, steering_facts, steering_record)

# The SteerGate operator versions, one per registered gate kind.
GATE_VERSIONS = tuple(sorted(GATE_KINDS))
# The SteerShift operator versions, one per registered shift mode.
SHIFT_VERSIONS = tuple(sorted(SHIFT_MODES))

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
