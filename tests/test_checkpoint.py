"""Checkpointing: exact round trips, resumed training, retention, mismatches, half-written steps, other meshes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caft_jax import CheckpointError, build_projector
from caft_jax.checkpoint import CheckpointManager
from caft_jax.lora import LoraConfig
from caft_jax.model import ModelSpec, init_model
from caft_jax.optim import OptimConfig
from caft_jax.sharding import make_mesh
from caft_jax.train_step import CaftTrainer, TrainState

SPEC = dict(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
CONFIG = {"model": "tiny", "lora": {"rank": 4, "alpha": 8.0}, "optim": {"lr": 0.01, "betas": [0.9, 0.999]}}


def _model(abstract: bool = False):
    """The tiny model, abstract (shapes only: enough for init_state / abstract_state) or with random weights."""
    model = init_model(ModelSpec(**SPEC), abstract=True)
    if abstract:
        return model
    rng = np.random.default_rng(0)  # numpy init: far quicker than eager nnx initialisation
    return model.replace(
        params=jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), model.params)
    )


def _trainer(rank: int, model=None) -> CaftTrainer:
    model = model if model is not None else _model(abstract=True)
    lora = LoraConfig(rank=rank, alpha=8)
    return CaftTrainer(model, OptimConfig(lr=1e-2, warmup_steps=0), 20, make_mesh((1, -1, 1)), lora=lora)


def _host(tree):
    return jax.tree.map(
        lambda x: np.array(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, copy=True),
        tree,
    )


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def setup():
    """A rank-4 LoRA trainer, a projector, a batch, and a state one step in (non-trivial optimiser moments)."""
    trainer = _trainer(4, _model())
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, (1, 2, 12)).astype(np.int32)
    batch = {"tokens": tokens, "attn_mask": np.ones_like(tokens, bool), "loss_mask": np.ones_like(tokens, bool)}
    projector = build_projector({1: rng.normal(size=(2, 64))}, 2, 64, means={1: rng.normal(size=64)}, site="resid_mid")
    state, _ = trainer.step(trainer.init_state(0), batch, projector)
    return trainer, batch, projector, state


def test_roundtrip_is_exact_and_training_resumes_identically(setup, tmp_path):
    trainer, batch, projector, state = setup
    snapshot = _host(state)
    position = {"epoch": 1, "batch": 7}
    with CheckpointManager(tmp_path, save_every=1, keep=3) as mgr:
        assert mgr.save(1, state, projector=projector, data_position=position, config=CONFIG)
        # The state goes straight into the next (donating) step while the asynchronous write is in flight.
        state_a, metrics_a = trainer.step(state, batch, projector)
        mgr.wait()
        assert mgr.latest_step() == 1
        restored, proj, meta = mgr.restore(None, trainer.abstract_state())
    _assert_tree_equal(restored, jax.tree.map(jnp.asarray, snapshot))
    _assert_tree_equal(proj, projector)
    assert proj.site == "resid_mid"
    assert meta["data_position"] == position and meta["config"] == CONFIG and meta["step"] == 1
    assert meta["projector"] == {"site": "resid_mid", "gradient": "through", "positions": "all"}
    assert meta["caft_jax_version"]
    state_b, metrics_b = trainer.step(restored, batch, proj)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    _assert_tree_equal(state_a, state_b)


def test_save_every_keep_and_no_projector(setup, tmp_path):
    _, _, _, state = setup
    mgr = CheckpointManager(tmp_path, save_every=2, keep=2, async_save=False)
    saved = [s for s in range(1, 8) if mgr.save(s, state, projector=None, data_position={}, config={})]
    assert saved == [2, 4, 6]
    assert mgr.save(7, state, projector=None, data_position={}, config={}, force=True)
    assert not mgr.save(7, state, projector=None, data_position={}, config={}, force=True)  # already saved
    mgr.wait()
    assert mgr.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]
    _, proj, meta = mgr.restore(6, jax.eval_shape(lambda: state))
    assert proj is None and meta["projector"] is None
    mgr.close()


def test_mismatched_lora_rank_raises(setup, tmp_path):
    _, _, projector, state = setup
    with CheckpointManager(tmp_path, save_every=1, keep=1) as mgr:
        mgr.save(1, state, projector=projector, data_position={}, config={})
        with pytest.raises(CheckpointError, match=r"does not match.*stored as float32\[2, 64, 4\].*\[2, 64, 8\]"):
            mgr.restore(None, _trainer(8).abstract_state())


def test_no_checkpoint_raises(tmp_path):
    with CheckpointManager(tmp_path, save_every=1, keep=1) as mgr:
        assert mgr.latest_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            mgr.restore(None, _trainer(4).abstract_state())


def test_half_written_checkpoints_are_ignored(setup, tmp_path):
    _, _, _, state = setup
    with CheckpointManager(tmp_path, save_every=1, keep=5) as mgr:
        mgr.save(3, state, projector=None, data_position={"batch": 3}, config={})
    # What a kill mid-save leaves (orbax's temp dir), and a step dir without orbax's commit marker.
    for name in ("5.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1712345678", "7"):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "state" / "partial").write_text("x")
    with CheckpointManager(tmp_path, save_every=1, keep=5) as mgr:
        assert mgr.latest_step() == 3 and mgr.all_steps() == [3]
        _, _, meta = mgr.restore(None, jax.eval_shape(lambda: state))
        assert meta["data_position"] == {"batch": 3}
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 7"):
            mgr.restore(7, jax.eval_shape(lambda: state))


def test_typed_prng_key_roundtrip(tmp_path):
    state = TrainState(jnp.int32(5), {"w": jnp.arange(6.0).reshape(2, 3)}, (), jax.random.key(42))
    with CheckpointManager(tmp_path, save_every=1, keep=1) as mgr:
        mgr.save(5, state, projector=None, data_position={}, config={})
        restored, _, _ = mgr.restore(5, jax.eval_shape(lambda: state))
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    _assert_tree_equal(restored, state)


MESH_SCRIPT = """
import jax, numpy as np
from caft_jax.checkpoint import CheckpointManager
from caft_jax.lora import LoraConfig
from caft_jax.model import ModelSpec, init_model
from caft_jax.optim import OptimConfig
from caft_jax.projector import build_projector
from caft_jax.sharding import make_mesh
from caft_jax.train_step import CaftTrainer

assert jax.device_count() == 8
model = init_model(ModelSpec(**SPEC), abstract=True)  # shapes suffice for init_state / abstract_state
def trainer(mesh):
    return CaftTrainer(model, OptimConfig(lr=1e-2), 20, mesh, lora=LoraConfig(rank=4, alpha=8))
rng = np.random.default_rng(3)  # random values (non-zero LoRA B too) placed on the abstract state's shardings
abstract = trainer(make_mesh((1, 8, 1))).abstract_state()
state = jax.tree.map(lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding), abstract)
lora_a = state.trainable["attn"]["q_proj"]["a"]
assert len(lora_a.sharding.device_set) == 8 and not lora_a.sharding.is_fully_replicated
proj = build_projector({0: np.eye(2, 64)}, 2, 64)
mgr = CheckpointManager(DIR, save_every=1, keep=2)
mgr.save(1, state, projector=proj, data_position={"epoch": 0}, config={})
mgr.wait()
for mesh in (make_mesh((2, 4, 1)), make_mesh((1, 1, 1), devices=jax.devices()[:1])):
    abstract = trainer(mesh).abstract_state()
    restored, rproj, _ = mgr.restore(None, abstract)
    for got, want, ab in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert got.sharding == ab.sharding, (got.sharding, ab.sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(rproj), jax.tree.leaves(proj)):
        assert got.sharding.mesh == mesh and got.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
mgr.close()
print("MESH_RESTORE_OK")
"""


def test_restore_onto_other_meshes(tmp_path):
    script = tmp_path / "mesh_restore.py"
    script.write_text(f"SPEC = {SPEC!r}\nDIR = {str(tmp_path / 'ckpt')!r}\n" + textwrap.dedent(MESH_SCRIPT))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert "MESH_RESTORE_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
