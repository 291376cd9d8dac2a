"""Ahead-of-time TPU compilation (python -m caft_jax.aot) of a tiny config for a v5e:2x2 topology, on this CPU host."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
NO_LIBTPU = importlib.util.find_spec("libtpu") is None


def run_aot(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, so libtpu's compile-only client never enters the test process."""
    return subprocess.run(
        [sys.executable, "-m", "caft_jax.aot", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(
    NO_LIBTPU,
    reason='libtpu is not installed: compiling for a TPU topology needs it even on a CPU host (pip install "jax[tpu]")',
)
def test_tiny_lora_step_compiles_for_v5e_2x2(tmp_path):
    """SmolLM2-135M shapes, LoRA recipe, batch 4 x seq 64: the sharded step compiles and the report is sane."""
    out = tmp_path / "report.json"
    proc = run_aot(
        "--config",
        "configs/em_qwen2.5_coder_32b.yaml",
        "--topology",
        "v5e:2x2",
        "--preset",
        "smollm2-135m",
        "batch_size=4",
        "grad_accum=1",
        "data.max_len=64",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["topology"] == "v5e:2x2" and report["devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tp": 1}
    assert report["batch"] == [1, 4, 64]
    assert report["fits"] is True and "error" not in report
    assert 0 < report["per_device_gib"] <= report["hbm_gib"] == 16
    assert report["argument_gib"] > 0
    assert report["compile_seconds"] > 0
    assert report["model_flops_per_device"] > 0 and report["xla_flops_per_device"] > 0
    assert 0 < report["trainable"] < report["params"]  # LoRA: a small trainable tree beside the frozen base
    assert "fits" in proc.stdout and "per-device memory" in proc.stdout


def test_unknown_chip_is_a_clear_error():
    proc = run_aot("--config", "configs/em_qwen2.5_coder_32b.yaml", "--topology", "v9x:2x2", "--preset", "smollm2-135m")
    assert proc.returncode == 2
    assert "v5e:2x4" in proc.stderr and "v5p" in proc.stderr
