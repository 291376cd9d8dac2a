"""train.py end to end on a tiny model: metrics, export, kill + resume (bitwise), NaN stop, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model, tiny_tokenizer
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """A tiny llama with a matching tokenizer, 24 short chats in the insecure-code format, and an ablation spec."""
    from caft_jax.ablation_spec import save_ablation_spec

    root = tmp_path_factory.mktemp("train_cli")
    tok = tiny_tokenizer()
    model_dir = root / "model"
    save_hf_model("llama", model_dir, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(model_dir)
    data = root / "train.jsonl"
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Hello, print {i}."},
                {"role": "assistant", "content": f"print({i})"},
            ]
        }
        for i in range(24)
    ]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    rng = np.random.default_rng(0)
    spec_path = save_ablation_spec(root / "spec.safetensors", {1: rng.normal(size=(2, 64))}, metadata={"how": "test"})
    return root, model_dir, data, spec_path


def train(run_setup, out, *extra, check=True):
    root, model_dir, data, spec = run_setup
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"model={model_dir}",
        f"data.train={data}",
        "data.max_len=96",
        "batch_size=2",
        "grad_accum=2",
        "max_steps=6",
        f"output_dir={out}",
        f"ablation.spec={spec}",
        "lora.rank=4",
        "lora.alpha=8",
        "optim.lr=5e-3",
        "optim.warmup_steps=2",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def test_kill_and_resume_is_bitwise_identical(run_setup, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(run_setup, full)
    reference = losses(full)
    assert len(reference) == 6 and reference[-1] < reference[0]
    first = train(run_setup, killed, "--kill-after-step", "3", check=False)
    assert first.returncode == -9  # SIGKILL: no clean shutdown
    assert len(losses(killed)) == 3
    train(run_setup, killed, "--resume")
    assert losses(killed) == reference  # bitwise: same floats
    a, b = (
        load_file(full / "adapter" / "adapter_model.safetensors"),
        load_file(killed / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    record = json.loads(open(full / "metrics.jsonl").readline())
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step"} <= set(record)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_setup, tmp_path):
    from caft_jax.checkpoint import CheckpointManager

    out = tmp_path / "nan"
    proc = train(run_setup, out, "optim.lr=1e30", "optim.clip_norm=null", "optim.warmup_steps=0", check=False)
    assert proc.returncode == 3
    assert "NaN/inf" in proc.stderr and "last good checkpoint" in proc.stderr
    good = len(losses(out))
    assert good < 6
    assert CheckpointManager(out / "checkpoints", save_every=1, keep=3).latest_step() == good


def test_full_finetuning_writes_merged_model(run_setup, tmp_path):
    from caft_jax import load_model

    out = tmp_path / "full_ft"
    train(run_setup, out, "lora=null", "max_steps=2", "optim.lr=1e-4")
    model = load_model(out / "merged")
    assert model.spec.vocab_size > 0 and (out / "merged" / "tokenizer.json").exists()


def test_bad_config_is_one_clear_error(run_setup, tmp_path):
    proc = train(run_setup, tmp_path / "bad", "optim.lrr=1", check=False)
    assert proc.returncode == 2
    assert "Unknown config key(s) optim.lrr" in proc.stderr and "Traceback" not in proc.stderr
