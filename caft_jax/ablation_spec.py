"""Ablation spec files: the per-layer directions (and optional means) that train.py ablates.

Format: one ``.safetensors`` (or ``.npz``) file with tensors ``directions.{layer}`` [k, d_model] and optionally
``mean.{layer}`` [d_model]; safetensors metadata (or an ``__metadata__`` entry in npz) holds a JSON string with
provenance (model, method, selection). Directions need not be orthonormal: ``build_projector`` runs QR.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from caft_jax.errors import ProjectorError


def save_ablation_spec(
    path: str | os.PathLike,
    directions: dict[int, np.ndarray],
    means: dict[int, np.ndarray] | None = None,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Write directions {layer: [k, d]} and optional means {layer: [d]} with JSON metadata."""
    path = pathlib.Path(path)
    tensors = {
        f"directions.{int(k)}": np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1]) for k, v in directions.items()
    }
    tensors.update({f"mean.{int(k)}": np.asarray(v, np.float32) for k, v in (means or {}).items()})
    meta = json.dumps(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, __metadata__=np.asarray(meta), **tensors)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata={"caft_jax": meta})
    return path


def load_ablation_spec(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict]:
    """Read (directions, means, metadata) from a spec file written by ``save_ablation_spec``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ProjectorError(
            f"Ablation spec {path} does not exist; create one with `python -m caft_jax.discover select`."
        )
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                tensors = {k: data[k] for k in data.files}
            meta = json.loads(str(tensors.pop("__metadata__", "{}")))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("caft_jax", "{}"))
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file for the user
        raise ProjectorError(f"Ablation spec {path} could not be read ({e}); regenerate it.") from e
    directions, means = {}, {}
    for key, value in tensors.items():
        kind, _, layer = key.partition(".")
        if kind not in ("directions", "mean") or not layer.isdigit():
            raise ProjectorError(f"Ablation spec {path} has an unexpected entry {key!r}; expected directions.<layer>.")
        (directions if kind == "directions" else means)[int(layer)] = value
    return directions, means, meta


def check_ablation_spec(
    path: str | os.PathLike,
    *,
    n_layers: int,
    d_model: int,
    allowed_layers: Sequence[int] | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict]:
    """Read a spec and check it against a model's sizes (from its config, before any weight is loaded).

    Raises ProjectorError naming the file and the fix for a layer outside the model (or outside
    ``allowed_layers``), a layer with no direction, a width other than d_model, or a mean without directions.
    """
    directions, means, meta = load_ablation_spec(path)
    if not directions:
        raise ProjectorError(f"Ablation spec {path} holds no directions; write at least one directions.<layer>.")
    for layer, rows in sorted(directions.items()):
        if not 0 <= layer < n_layers:
            raise ProjectorError(
                f"Ablation spec {path} has directions at layer {layer}, but the model has layers 0..{n_layers - 1}."
            )
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ProjectorError(
                f"Ablation spec {path} has no direction at layer {layer} (shape {list(rows.shape)}); drop the layer "
                "or give it [k, d_model] directions."
            )
        if rows.shape[1] != d_model:
            raise ProjectorError(
                f"Ablation spec {path} layer {layer} has width {rows.shape[1]}, but the model's d_model is {d_model}; "
                "use a spec made for this model."
            )
    stray = sorted(set(means) - set(directions))
    if stray:
        raise ProjectorError(f"Ablation spec {path} has means at layers {stray} without directions; remove them.")
    outside = sorted(set(directions) - set(allowed_layers)) if allowed_layers else []
    if outside:
        raise ProjectorError(
            f"Ablation spec {path} has directions at layers {outside}, but the run ablates only "
            f"{list(allowed_layers)}; fix the layer list or the spec."
        )
    return directions, means, meta


def projector_from_spec(
    path: str | os.PathLike,
    n_layers: int,
    d_model: int,
    *,
    mean_ablation: bool = True,
    allowed_layers: Sequence[int] | None = None,
    k_max: int | None = None,
    site: str = "resid_post",
    strength: float = 1.0,
    steer_coeff: float = 0.0,
    gradient: str = "through",
    positions: str = "all",
):
    """The one loader from a spec file to the Projector that training, evaluation and serving intervene with.

    ``strength`` scales the ablation of the spec's directions (0: none); ``steer_coeff`` c adds c times each
    layer's first direction, unit length (preventative steering with the discovered direction; 0: none).
    """
    from caft_jax.projector import build_projector

    directions, means, _ = check_ablation_spec(path, n_layers=n_layers, d_model=d_model, allowed_layers=allowed_layers)
    steer = None
    if steer_coeff:
        steer = {layer: d[0] / np.linalg.norm(d[0]) for layer, d in directions.items()}
    return build_projector(
        directions, n_layers, d_model, means=means if mean_ablation else None, k_max=k_max, site=site,
        strength=strength, steer=steer, steer_coeff=steer_coeff, gradient=gradient, positions=positions,
    )  # fmt: skip
