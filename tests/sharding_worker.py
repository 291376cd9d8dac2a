"""Subprocess worker for the sharding tests (JAX device counts must be fixed before JAX starts).

python sharding_worker.py meshes MODEL_DIR OUT.json          8 forced CPU devices, several meshes
python sharding_worker.py process MODEL_DIR OUT.json PID N PORT   one of N processes (2 CPU devices each, gloo)
"""

from __future__ import annotations

import json
import os
import sys

mode, model_dir, out_path = sys.argv[1:4]
if mode == "meshes":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402

if mode == "process":
    pid, nproc, port = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train_step import responses_only_batch  # noqa: E402

from caft_jax import build_projector, load_model  # noqa: E402
from caft_jax.lora import LoraConfig  # noqa: E402
from caft_jax.optim import OptimConfig  # noqa: E402
from caft_jax.sharding import make_mesh, tree_shardings  # noqa: E402
from caft_jax.train_step import CaftTrainer  # noqa: E402


def run(mesh, steps=3, lora=True):
    # lr 1e-4: Adam turns a rounding-level gradient difference on a near-zero gradient into a ~lr-sized update
    # difference (sign flip), so parameter equality to 1e-5 is a meaningful check only at small learning rates.
    model = load_model(model_dir, mesh=mesh)
    lora_cfg = LoraConfig(rank=4, alpha=8) if lora else None
    trainer = CaftTrainer(model, OptimConfig(lr=1e-4, warmup_steps=1, weight_decay=0.01), 10, mesh, lora=lora_cfg)
    state = trainer.init_state(seed=0)
    spec = model.spec
    rng = np.random.default_rng(0)
    projector = build_projector({1: rng.normal(size=(2, spec.d_model))}, spec.n_layers, spec.d_model)
    batch = responses_only_batch(accum=2, rows=8, t=16)
    losses = []
    for _ in range(steps):
        rows = batch["tokens"].shape[1] // jax.process_count()  # this process's contiguous block of rows
        lo = jax.process_index() * rows
        local = {k: v[:, lo : lo + rows] for k, v in batch.items()}
        state, metrics = trainer.step(state, local, projector)
        losses.append(float(metrics["loss"]))
    declared = tree_shardings(state.trainable, mesh)
    same = jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), state.trainable, declared))
    gathered = jax.experimental.multihost_utils.process_allgather(state.trainable, tiled=True)
    return losses, jax.tree.map(np.asarray, gathered), all(same), state


if mode == "meshes":
    devices = jax.devices()
    results = {}
    single = make_mesh((1, 1, 1), devices[:1])
    reference = {lora: run(single, steps=2, lora=lora)[:2] for lora in (True, False)}
    for shape in [(2, 4, 1), (1, 8, 1), (1, 4, 2)]:
        for lora in (True, False):
            ref_losses, ref_params = reference[lora]
            losses, params, shardings_ok, state = run(make_mesh(shape, devices), steps=2, lora=lora)
            diff = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
            )
            sharded = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.trainable)]
            results[f"{shape}-{'lora' if lora else 'full'}"] = {
                "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
                "param_diff": diff,
                "shardings_ok": shardings_ok,
                "n_sharded_leaves": sum(s != "PartitionSpec()" for s in sharded),
            }
    json.dump(results, open(out_path, "w"))
else:
    losses, params, ok, _ = run(make_mesh((1, -1, 1)))
    if jax.process_index() == 0:
        json.dump({"losses": losses, "devices": jax.device_count(), "shardings_ok": ok}, open(out_path, "w"))
