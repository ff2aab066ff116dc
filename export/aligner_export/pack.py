"""The steering pack: one safetensors file (ARCHITECTURE.md §4)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aligner_runtime.contract import SITE, SteerConfig
from aligner_runtime.errors import AlignerError, atomic_path

FORMAT_VERSION = 1
TOKEN = "last_prompt_token"
MODES = ("cross-model", "self")
BIAS_RULES = ("paper", "fpr")
TENSORS = ("target.srv", "target.mean_harmful", "target.mean_harmless", "aligned.srv")


@dataclass
class SteeringPack:
    target_srv: np.ndarray
    target_mean_harmful: np.ndarray
    target_mean_harmless: np.ndarray
    aligned_srv: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.target_srv.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.target_srv.shape[1])

    @property
    def recommended(self) -> dict:
        return self.meta["recommended"]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    def layer_stats(self, layer: int) -> dict:
        return self.meta["per_layer"][layer]

    def bias(self, layer: int, rule: str) -> float:
        if rule not in BIAS_RULES:
            raise AlignerError(f"unknown bias rule '{rule}': use one of {', '.join(BIAS_RULES)}")
        return float(self.layer_stats(layer)[f"bias_{rule}"])

    def steer_config(self, gate_layer: int, steer_layers, alpha: float, bias_rule: str,
                     steer_impl: str = "function") -> SteerConfig:
        """The version-1 gate at ``gate_layer`` (the target's SRV, the pack's bias under ``bias_rule``) and the
        vectors ``alpha * theta_l`` of the steered layers."""
        vectors = {int(l): np.float32(alpha) * self.aligned_srv[int(l)] for l in steer_layers}
        return SteerConfig.single_layer(int(gate_layer), self.target_srv[int(gate_layer)],
                                        self.bias(int(gate_layer), bias_rule), vectors, steer_impl=steer_impl,
                                        rule=bias_rule)

    def config_of_export(self, manifest: dict) -> SteerConfig:
        """The steering configuration an export of this pack was made with, from its manifest: what the PyTorch
        reference needs to reproduce that export."""
        return self.steer_config(manifest["gate_layer"], manifest["steer_layers"], manifest["alpha"],
                                 manifest["bias_rule"], steer_impl=manifest.get("steer_impl", "function"))

    def tensors(self) -> dict[str, np.ndarray]:
        return {"target.srv": self.target_srv, "target.mean_harmful": self.target_mean_harmful,
                "target.mean_harmless": self.target_mean_harmless, "aligned.srv": self.aligned_srv}


def _check_arrays(tensors: dict[str, np.ndarray], where: str) -> tuple[int, int]:
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise AlignerError(f"{where}: not a steering pack (missing tensors {', '.join(missing)})")
    shape = tensors["target.srv"].shape
    if len(shape) != 2:
        raise AlignerError(f"{where}: target.srv must be [layers, hidden], got {list(shape)}")
    for name in TENSORS:
        arr = tensors[name]
        if arr.shape != shape or arr.dtype != np.float32:
            raise AlignerError(f"{where}: {name} must be float32 {list(shape)}, got {arr.dtype} {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise AlignerError(f"{where}: {name} holds NaN or inf values")
    return int(shape[0]), int(shape[1])


def save_pack(pack: SteeringPack, path) -> Path:
    """Writes the pack atomically: a temporary file beside ``path``, then a rename."""
    from safetensors.numpy import save_file

    path = Path(path)
    layers, hidden = _check_arrays(pack.tensors(), "pack")
    meta = dict(pack.meta, format_version=FORMAT_VERSION, num_layers=layers, hidden_size=hidden, site=SITE,
                token=TOKEN)
    tensors = {k: np.ascontiguousarray(v) for k, v in pack.tensors().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"inferaligner": json.dumps(meta, sort_keys=True)})
    pack.meta = meta
    return path


def load_pack(path) -> SteeringPack:
    """Reads and validates a pack; every problem is an :class:`AlignerError` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AlignerError(f"steering pack not found: {path}")
    try:
        with safe_open(str(path), framework="np") as fh:
            raw_meta = (fh.metadata() or {}).get("inferaligner")
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AlignerError(f"{path}: not a safetensors steering pack ({exc})") from None
    if raw_meta is None:
        raise AlignerError(f"{path}: no 'inferaligner' metadata; not a steering pack")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise AlignerError(f"{path}: the 'inferaligner' metadata is not valid JSON") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise AlignerError(f"{path}: unknown pack format version {version!r} (this package reads {FORMAT_VERSION})")
    layers, hidden = _check_arrays(tensors, str(path))
    if meta.get("num_layers") != layers or meta.get("hidden_size") != hidden:
        raise AlignerError(f"{path}: metadata says {meta.get('num_layers')}x{meta.get('hidden_size')}, "
                           f"tensors are {layers}x{hidden}")
    if meta.get("mode") not in MODES or len(meta.get("per_layer", [])) != layers or "recommended" not in meta:
        raise AlignerError(f"{path}: incomplete pack metadata (mode, per_layer or recommended)")
    for stats in meta["per_layer"]:
        if not all(math.isfinite(float(stats[f"bias_{r}"])) for r in BIAS_RULES):
            raise AlignerError(f"{path}: layer {stats['layer']} has a non-finite bias")
    return SteeringPack(tensors["target.srv"], tensors["target.mean_harmful"], tensors["target.mean_harmless"],
                        tensors["aligned.srv"], meta)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
