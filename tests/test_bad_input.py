"""Bad checkpoints and configs fail with a CheckpointError / ConfigError that names the thing and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from caft_jax import CheckpointError, ConfigError, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXES = (
    "re-download",
    "re-save",
    "pass ",
    "use ",
    "Use ",
    "supports",
    "save ",
    "check that",
    "add ",
    "re-convert",
    "must hold",
)


def assert_names_fix(exc: pytest.ExceptionInfo, *things: str) -> None:
    msg = str(exc.value)
    for thing in things:
        assert thing in msg, f"{thing!r} not named in: {msg}"
    assert any(fix in msg for fix in FIXES), f"no fix suggested in: {msg}"
    assert "\n" not in msg


@pytest.fixture
def llama_dir(tiny_models, tmp_path):
    """A private copy of the tiny Llama checkpoint directory, free to break."""
    dst = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"][0], dst)
    return dst


_DELETE = object()


def edit_config(model_dir, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def test_good_copy_loads(llama_dir, tiny_models):
    """Control: the unbroken copy loads and holds the checkpoint's exact weights."""
    model = load_model(llama_dir)
    ref = tiny_models["llama"][1].model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.params["layers"]["attn"]["q_proj"][1]), ref.T)


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError) as exc:
        load_model(missing)
    assert_names_fix(exc, str(missing), "does not exist")


@pytest.mark.parametrize("keep", ["half", 4, 0])
def test_truncated_safetensors(llama_dir, keep):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, str(path), "truncated")


def test_corrupt_safetensors_header(llama_dir):
    path = llama_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"  # header length intact, JSON broken
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, str(path))


def rewrite_tensors(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_wrongly_shaped_tensor(llama_dir):
    name = "model.layers.1.self_attn.q_proj.weight"

    def edit(t):
        t[name] = t[name][:, :-1].copy()

    rewrite_tensors(llama_dir, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, name, "(64, 63)", "expected (64, 64)")
    # only that tensor is blamed
    assert "layers.0.self_attn.q_proj" not in str(exc.value) and "layers.2.self_attn" not in str(exc.value)


def test_missing_tensor(llama_dir):
    name = "model.layers.2.mlp.up_proj.weight"
    rewrite_tensors(llama_dir, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, name, "missing")


def test_unexpected_tensor(llama_dir):
    name = "model.layers.0.self_attn.q_norm.weight"
    rewrite_tensors(llama_dir, lambda t: t.__setitem__(name, np.ones(16, np.float32)))
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, name, "unexpected")


def test_safetensors_missing(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, str(llama_dir), ".safetensors")


def test_unknown_architecture(llama_dir):
    edit_config(llama_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, "GPT2LMHeadModel", "LlamaForCausalLM")


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "yarn"),
        # a transformers-4 spelling
        (dict(rope_parameters=_DELETE, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(hidden_act="relu"), "relu"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "factor"),
        # both keys, as Qwen's long-context guide has users edit a v5 config: transformers runs the rope_scaling one
        (
            dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
            ),
            "yarn",
        ),
    ],
)
def test_unimplemented_config_attribute(llama_dir, changes, named):
    edit_config(llama_dir, **changes)
    with pytest.raises(ConfigError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, named, "config.json")


def test_missing_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(ConfigError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, str(llama_dir / "config.json"), "missing")


@pytest.mark.parametrize("text", ['{"architectures": ["LlamaForCausalLM"], ', "", "[1, 2]"])
def test_malformed_config_json(llama_dir, text):
    (llama_dir / "config.json").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, str(llama_dir / "config.json"))


def test_config_without_required_key(llama_dir):
    edit_config(llama_dir, hidden_size=_DELETE)
    with pytest.raises(ConfigError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, "hidden_size", "config.json")


def test_config_disagreeing_with_weights(llama_dir):
    """A config from another model (fewer layers, other width) against these weights: the mismatch is named."""
    edit_config(llama_dir, num_hidden_layers=2, intermediate_size=80)
    with pytest.raises(CheckpointError) as exc:
        load_model(llama_dir)
    assert_names_fix(exc, "model.layers.2.", "model.layers.0.mlp.up_proj.weight", "expected (80, 64)")


@pytest.mark.parametrize("keep", [100, 2_000_000])
def test_truncated_or_garbage_gguf(smollm2_path, tmp_path, keep):
    path = tmp_path / "broken.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert_names_fix(exc, str(path))
    path.write_bytes(b"this is not a gguf file")
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    assert_names_fix(exc, str(path))


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "eval.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *things: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for thing in things:
        assert thing in lines[0]
    assert proc.stdout == ""


def test_eval_logits_missing_model_exits_2():
    proc = run_eval("logits", "--model", "/nonexistent")
    assert_one_error_line(proc, "/nonexistent")


def test_eval_logits_bad_config_exits_2(llama_dir):
    edit_config(llama_dir, num_hidden_layers=_DELETE)
    proc = run_eval("logits", "--model", str(llama_dir))
    assert_one_error_line(proc, "num_hidden_layers")
