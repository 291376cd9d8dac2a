"""Mesh construction and the one table that maps logical axis names to mesh axes.

Every array caft_jax places (base params, LoRA params, optimiser state, batches, the projector) gets its
NamedSharding from ``logical_sharding``: a tuple of logical axis names (see ``PARAM_AXES``)
is mapped through ``RULES`` to mesh axes. A mesh axis is dropped for a dimension it does not divide, so odd
sizes (e.g. 3 KV heads on a 4-way tp axis) fall back to replication instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from caft_jax.errors import ConfigError

# Logical axes of every parameter, by its name inside the model module that owns it (caft_jax.model.layers);
# the rules table below maps them to mesh axes.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "table": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "q_proj": ("layers", "embed", "q_heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "q_heads", "embed"),
    "q_bias": ("layers", "q_heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"),
    "post_mlp_norm": ("layers", "norm"),
}

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axes it is split over (None: replicated). FSDP shards weights on d_model; tensor
# parallelism splits heads, the MLP width and the vocabulary; batches split over data and fsdp.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": ("fsdp",),
    "vocab": ("tp",),
    "q_heads": ("tp",),
    "kv_heads": ("tp",),
    "mlp": ("tp",),
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "directions": None,
}


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh with Auto axis types; one -1 entry takes the remaining devices.

    Raises:
      ConfigError: if the shape does not use exactly the available devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh shape must have 3 entries (data, fsdp, tp); got {shape}.")
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh shape {shape} has more than one -1.")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // max(known, 1)
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are available; "
            "make data * fsdp * tp equal the device count."
        )
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU or unusual topologies: plain row-major order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    """Refuse a global batch that does not split evenly over the mesh's batch axes (data x fsdp) and processes."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % split or batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={batch_size} does not split over the mesh's data*fsdp={split} devices "
            f"({jax.process_count()} processes); make batch_size a multiple of {max(split, jax.process_count())}."
        )


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `axes`."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = RULES.get(name) if name else None
        picked = []
        for axis in mesh_axes or ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or size % (n * math.prod(mesh.shape[a] for a in picked)):
                continue
            picked.append(axis)
        used.update(picked)
        spec.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def param_axes(path: Sequence[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter from its path in the params dict (its last name keys PARAM_AXES).

    LoRA leaves ({..., kernel, "a"|"b"}) inherit the kernel's axes: A [L, in, r] keeps the input axis, B
    [L, r, out] the output axis, as qwix does.
    """
    name = path[-1]
    if name in ("a", "b") and len(path) >= 2 and path[-2] in PARAM_AXES:
        layers, inp, out = PARAM_AXES[path[-2]]
        return (layers, inp, "lora_rank") if name == "a" else (layers, "lora_rank", out)
    axes = PARAM_AXES.get(name)
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding for every leaf of a params-like dict (base params, LoRA weights or optimiser moments)."""

    def one(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        names = [str(n) for n in names if n is not None]
        return logical_sharding(param_axes(names, leaf.ndim), leaf.shape, mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Pin an activation's sharding by logical axes when a mesh is set (``jax.set_mesh``); a no-op otherwise.

    Without such hints XLA may pick a layout that replicates the batch for a big matmul (e.g. the LM head when
    d_model is fsdp-sharded), which multiplies the memory for logits by the number of devices.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
