"""train.py end to end on a tiny model: metrics, export, kill + resume (bitwise), NaN stop, config errors, and the
run-directory contract (refused reuse, resume mismatches, --overwrite, --resume-step, SIGINT/SIGTERM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hf_models import save_chat_model, write_chats
from safetensors.numpy import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """A tiny llama with a matching tokenizer, 24 short chats in the insecure-code format, and an ablation spec."""
    from caft_jax.ablation_spec import save_ablation_spec

    root = tmp_path_factory.mktemp("train_cli")
    model_dir = save_chat_model(root / "model")
    data = write_chats(root / "train.jsonl", 24)
    rng = np.random.default_rng(0)
    spec_path = save_ablation_spec(root / "spec.safetensors", {1: rng.normal(size=(2, 64))}, metadata={"how": "test"})
    return root, model_dir, data, spec_path


def train_command(run_setup, out, *extra) -> list[str]:
    root, model_dir, data, spec = run_setup
    return [
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


def train(run_setup, out, *extra, check=True):
    proc = subprocess.run(train_command(run_setup, out, *extra), capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("pack", [False, True])
def test_kill_and_resume_is_bitwise_identical(run_setup, tmp_path, pack):
    """Also with packed rows (data.pack): the packing plan is a function of (seed, epoch), so resume is exact."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = (f"data.pack={str(pack).lower()}",)
    train(run_setup, full, *extra)
    reference = losses(full)
    assert len(reference) == 6 and reference[-1] < reference[0]
    first = train(run_setup, killed, *extra, "--kill-after-step", "3", check=False)
    assert first.returncode == -9  # SIGKILL: no clean shutdown
    assert len(losses(killed)) == 3
    train(run_setup, killed, *extra, "--resume")
    assert losses(killed) == reference  # bitwise: same floats
    a, b = (
        load_file(full / "adapter" / "adapter_model.safetensors"),
        load_file(killed / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    record = json.loads(open(full / "metrics.jsonl").readline())
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step", "projection"} <= set(record)
    # the projection monitor: the spec's one ablated layer, what the ablation removed there (> 0, max >= mean)
    assert list(record["projection"]) == ["1"]
    assert 0 < record["projection"]["1"]["mean"] <= record["projection"]["1"]["max"]


def test_nan_loss_stops_names_the_last_good_step_and_resume_step_picks_one(run_setup, tmp_path):
    from caft_jax.checkpoint import CheckpointManager

    out = tmp_path / "nan"
    diverge = ("optim.lr=1e30", "optim.clip_norm=null", "optim.warmup_steps=0")
    proc = train(run_setup, out, *diverge, check=False)
    assert proc.returncode == 3
    good = len(losses(out))
    assert 0 < good < 6
    assert f"The last good checkpoint is step {good}" in proc.stderr and "Traceback" not in proc.stderr
    manager = CheckpointManager(out / "checkpoints", save_every=1, keep=3)
    assert manager.latest_step() == good
    manager.close()
    # --resume-step replays from the chosen step: the same divergence, and metrics.jsonl keeps each step once.
    again = train(run_setup, out, *diverge, "--resume-step", str(good), check=False)
    assert again.returncode == 3, again.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(1, good + 1))
    missing = train(run_setup, out, *diverge, "--resume-step", "99", check=False)
    assert missing.returncode == 2 and "no complete checkpoint for step 99" in missing.stderr


def snapshot(folder):
    """{relative path: bytes} of every file under folder (to show that a refused command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(run_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(run_setup, out, "max_steps=2")
    return out


def test_existing_run_is_refused_without_resume_or_overwrite(run_setup, finished_run):
    before = snapshot(finished_run)
    proc = train(run_setup, finished_run, "max_steps=2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds files of another run; pass --resume" in proc.stderr and "--overwrite" in proc.stderr
    assert snapshot(finished_run) == before


@pytest.mark.parametrize(
    "change, named",
    [
        (("max_steps=2", "optim.lr=1e-3"), "optim.lr: 0.005 in the run, 0.001 requested"),
        (("max_steps=2", "batch_size=1", "grad_accum=4"), "batch_size: 2 in the run, 1 requested"),
        (("max_steps=2", "lora.rank=8", "lora.alpha=16"), "lora.rank: 4 in the run, 8 requested"),
    ],
)
def test_resume_with_another_recipe_names_each_difference(run_setup, finished_run, change, named):
    before = snapshot(finished_run)
    proc = train(run_setup, finished_run, *change, "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resume" in proc.stderr and named in proc.stderr
    assert snapshot(finished_run) == before


def test_resume_with_other_data_or_another_model_is_refused(run_setup, finished_run, tmp_path):
    root, model_dir, data, _ = run_setup
    before = snapshot(finished_run)
    edited = tmp_path / "train.jsonl"
    edited.write_text(data.read_text().replace("print(3)", "print(33)"))
    proc = train(run_setup, finished_run, "max_steps=2", f"data.train={edited}", "--resume", check=False)
    assert proc.returncode == 2 and "data.train" in proc.stderr
    other_model = tmp_path / "model"
    shutil.copytree(model_dir, other_model)
    weights = other_model / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights)
    proc = train(run_setup, finished_run, "max_steps=2", f"model={other_model}", "--resume", check=False)
    assert proc.returncode == 2 and "the model's config or weights differ" in proc.stderr
    assert snapshot(finished_run) == before


def test_resume_without_a_run_and_overwrite(run_setup, finished_run, tmp_path):
    empty = tmp_path / "empty"
    proc = train(run_setup, empty, "max_steps=2", "--resume", check=False)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stderr and not empty.exists()
    both = train(run_setup, finished_run, "--resume", "--overwrite", check=False)
    assert both.returncode == 2 and "contradict" in both.stderr
    target = tmp_path / "again"
    shutil.copytree(finished_run, target)
    (target / "stale.txt").write_text("from an older run")
    train(run_setup, target, "max_steps=3", "--overwrite")
    assert not (target / "stale.txt").exists() and len(losses(target)) == 3


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_resume_finishes_the_run(run_setup, tmp_path, sig, code):
    """SIGINT/SIGTERM mid-run: one line, exit 130/143, a final checkpoint, no orbax tmp dir; resume is bitwise."""
    reference = tmp_path / "reference"
    train(run_setup, reference, "max_steps=12")
    out = tmp_path / "interrupted"
    cmd = train_command(run_setup, out, "max_steps=12")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    stopped = len(losses(out))
    assert stopped < 12, "the run finished before the signal arrived"
    assert f"interrupted at step {stopped}; rerun with --resume" in stderr and "Traceback" not in stderr
    assert not list((out / "checkpoints").glob("*tmp*"))
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == stopped
    train(run_setup, out, "max_steps=12", "--resume")
    assert losses(out) == losses(reference)


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
