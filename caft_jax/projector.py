"""The concept-ablation projector: data, not parameters.

CAFT replaces the residual stream h at chosen layers by its projection onto the orthogonal complement of a
concept subspace, h <- h - (h Q) Q^T (zero-ablation), or h <- h - ((h - mu) Q) Q^T (mean-ablation: the subspace
component is set to that of mu instead of zero). The projector holds one basis per layer, stacked to
[n_layers, d_model, k_max] with zero-padded columns, so that

* a layer without directions has Q = 0 and the update is exactly h - 0 = h (an exact no-op), and
* one array serves the scanned layer stack; new directions are new values of the same shapes, so they never
  trigger a recompile.

The forward receives the projector as an ordinary traced argument. Gradients flow through the projection
(it is linear and is not stop-gradiented), so the gradient reaching upstream layers is projected too, as in the
authors' forward hook.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.errors import ProjectorError
from caft_jax.model.layers import matmul

SITES = ("resid_post", "resid_mid")


@flax.struct.dataclass
class Projector:
    """Stacked orthonormal bases of the ablated subspaces.

    Attributes:
      basis: [n_layers, d_model, k_max]; columns orthonormal, zero columns project nothing.
      offset: [n_layers, d_model]; mean-ablation offset mu (zeros = the paper's zero-ablation).
      site: "resid_post" (decoder-layer output, the authors' hook site) or "resid_mid" (between attention and
        MLP). Static: changing the site changes the program.
    """

    basis: jax.Array
    offset: jax.Array
    site: str = flax.struct.field(pytree_node=False, default="resid_post")

    @property
    def n_layers(self) -> int:
        return self.basis.shape[0]

    @property
    def k_max(self) -> int:
        return self.basis.shape[2]

    def ranks(self) -> np.ndarray:
        """Number of non-zero basis columns per layer, [n_layers] (host-side, for reporting)."""
        return (np.abs(np.asarray(self.basis)).sum(axis=1) > 0).sum(axis=1)


def empty_projector(n_layers: int, d_model: int, k_max: int = 1, dtype=jnp.float32, site: str = "resid_post"):
    """A projector that ablates nothing (all-zero bases): the forward computes the plain model."""
    return Projector(
        basis=jnp.zeros((n_layers, d_model, k_max), dtype), offset=jnp.zeros((n_layers, d_model), dtype), site=site
    )


def _orthonormalise(layer: int, directions: np.ndarray, d_model: int, rank_tol: float) -> np.ndarray:
    """QR in float64 of directions [k, d_model] -> orthonormal basis [d_model, k], with validation."""
    if directions.ndim == 1:
        directions = directions[None, :]
    if directions.ndim != 2:
        raise ProjectorError(
            f"Directions for layer {layer} have shape {directions.shape}; expected [k, d_model={d_model}]."
        )
    if directions.shape[1] != d_model:
        raise ProjectorError(
            f"Directions for layer {layer} have width {directions.shape[1]} but the model's d_model is {d_model}; "
            "they were probably computed on another model."
        )
    if not np.all(np.isfinite(directions)):
        raise ProjectorError(f"Directions for layer {layer} contain NaN or inf values; recompute them.")
    k = directions.shape[0]
    if k > d_model:
        raise ProjectorError(f"Layer {layer} has {k} directions, more than d_model={d_model}.")
    q, r = np.linalg.qr(directions.T.astype(np.float64))  # [d, k], [k, k]
    diag = np.abs(np.diag(r))
    scale = max(np.linalg.norm(directions, axis=1).max(), 1e-300)
    if k and diag.min() <= rank_tol * scale:
        raise ProjectorError(
            f"The {k} directions for layer {layer} are linearly dependent (rank < {k}); drop duplicates or "
            "near-parallel directions."
        )
    return q


def build_projector(
    directions: Mapping[int, np.ndarray] | None,
    n_layers: int,
    d_model: int,
    *,
    means: Mapping[int, np.ndarray] | None = None,
    k_max: int | None = None,
    site: str = "resid_post",
    dtype=jnp.float32,
    rank_tol: float = 1e-6,
) -> Projector:
    """Build the stacked projector on the host from per-layer directions.

    Args:
      directions: {layer: [k, d_model]} raw directions (need not be orthonormal or unit length); QR in float64
        orthonormalises them. Layers absent from the mapping are not ablated.
      n_layers, d_model: the model's sizes, for validation.
      means: optional {layer: [d_model]} mean-ablation offsets mu.
      k_max: width of the padded stack (default: the largest k). Keep it fixed across runs to reuse compiles.
      site: "resid_post" or "resid_mid".
      dtype: dtype of the stored basis (float32 by default; the product is accumulated in float32 regardless).

    Raises:
      ProjectorError: layer out of range, width mismatch, non-finite values, rank deficiency, bad site or k_max.
    """
    if site not in SITES:
        raise ProjectorError(f"Unknown ablation site {site!r}; use one of {', '.join(SITES)}.")
    directions = dict(directions or {})
    means = dict(means or {})
    for layer in list(directions) + list(means):
        if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n_layers:
            raise ProjectorError(f"Ablation layer {layer!r} is out of range; the model has layers 0..{n_layers - 1}.")
    bases = {
        int(layer): _orthonormalise(int(layer), np.asarray(d, dtype=np.float64), d_model, rank_tol)
        for layer, d in directions.items()
    }
    widest = max((b.shape[1] for b in bases.values()), default=0)
    k_max = max(widest, 1) if k_max is None else k_max
    if widest > k_max:
        raise ProjectorError(f"A layer has {widest} directions but k_max={k_max}; raise k_max.")
    basis = np.zeros((n_layers, d_model, k_max), np.float64)
    for layer, b in bases.items():
        basis[layer, :, : b.shape[1]] = b
    offset = np.zeros((n_layers, d_model), np.float64)
    for layer, mu in means.items():
        mu = np.asarray(mu, dtype=np.float64)
        if mu.shape != (d_model,) or not np.all(np.isfinite(mu)):
            raise ProjectorError(
                f"Mean offset for layer {layer} must be a finite vector of shape ({d_model},); got {mu.shape}."
            )
        offset[int(layer)] = mu
    return Projector(basis=jnp.asarray(basis, dtype), offset=jnp.asarray(offset, dtype), site=site)


def ablate(h: jax.Array, basis: jax.Array, offset: jax.Array, matmul_dtype=None) -> jax.Array:
    """h - ((h - mu) Q) Q^T for one layer, with a hand-written VJP.

    Args:
      h: [batch, seq, d_model] residual stream, any float dtype.
      basis: [d_model, k] orthonormal (or zero) columns.
      offset: [d_model] mean-ablation offset mu.
      matmul_dtype: operand dtype of the two products (default: h's dtype); they accumulate in float32.
    Returns:
      [batch, seq, d_model] in h's dtype. The subtraction runs in float32, so a bf16 stream is rounded once, after
      the correction. The VJP keeps the products' form (autodiff would run the backward products on the float32
      cotangent, i.e. in float32); the gradient reaching h is projected the same way, g - (g Q) Q^T.
    """
    return _ablate(jnp.dtype(matmul_dtype or h.dtype), h, basis, offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ablate(operand, h, basis, offset):
    q = basis.astype(operand)
    return _subtract_span(h, matmul("btd,dk->btk", (h - offset.astype(h.dtype)).astype(operand), q, operand), q)


def _subtract_span(x: jax.Array, coeff: jax.Array, basis: jax.Array) -> jax.Array:
    """x - coeff Q^T, subtracted in float32 and rounded to x's dtype: [b, t, d]."""
    correction = matmul("btk,dk->btd", coeff, basis, jnp.promote_types(x.dtype, jnp.float32))
    return (x - correction).astype(x.dtype)


def _ablate_fwd(operand, h, basis, offset):
    return _ablate(operand, h, basis, offset), (h, basis, offset)


def _ablate_bwd(operand, residuals, g):
    h, basis, offset = residuals
    q = basis.astype(operand)
    g_coeff = matmul("btd,dk->btk", g.astype(operand), q, operand)  # [b, t, k]
    d_h = _subtract_span(g.astype(h.dtype), g_coeff, q)
    # The projector is data (never trained), so these two are dead code in a training step; they keep the VJP
    # exact for anyone differentiating with respect to the directions or the offset.
    centred = (h - offset.astype(h.dtype)).astype(operand)
    coeff = matmul("btd,dk->btk", centred, q, operand)
    acc = jnp.promote_types(operand, jnp.float32)
    d_basis = matmul("btd,btk->dk", centred, g_coeff, acc) + matmul("btd,btk->dk", g.astype(operand), coeff, acc)
    d_offset = matmul("btk,dk->d", g_coeff, q, offset.dtype)
    return d_h, (-d_basis).astype(basis.dtype), d_offset


_ablate.defvjp(_ablate_fwd, _ablate_bwd)
