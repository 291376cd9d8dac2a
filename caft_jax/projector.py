"""The training-time intervention on the residual stream (concept ablation and its family): data, not parameters.

CAFT replaces the residual stream h at chosen layers by its projection onto the orthogonal complement of a
concept subspace, h <- h - (h Q) Q^T (zero-ablation), or h <- h - ((h - mu) Q) Q^T (mean-ablation: the subspace
component is set to that of mu instead of zero). The family around it (caft_method.md section 8) needs the same
place in the forward, so one ``Projector`` carries, per layer l:

    h <- h - m * alpha_l ((h - mu_l) Q_l) Q_l^T + m * c_l v_l

with a strength alpha (partial ablation; 1 = CAFT), an additive steering vector v with its coefficient c
(preventative steering, Chen et al. 2025), and a token mask m [b, t] (all positions, or the prompt / response
positions built from the loss mask). Everything per layer is stacked over the layers ([n_layers, d_model, k_max]
bases with zero-padded columns, [n_layers] strengths, ...), so that

* a layer without directions or steering has Q = 0 and c = 0 and the update is exactly h (an exact no-op), and
* one set of arrays serves the scanned layer stack; new directions, strengths, coefficients and masks are new
  values of the same shapes, so they never trigger a recompile. (A projector with strength 1 everywhere and no
  steering, CAFT's, carries no strength or steering arrays at all, so it computes exactly the two-array update;
  a sweep that includes those defaults compiles once more for them.)

What changes the program is static: the site, the token rule, and the gradient mode:

* ``through`` (CAFT): the gradient flows through the projection, so the gradient reaching upstream layers is
  projected too, as in the authors' forward hook;
* ``detached``: the forward is ablated but the gradient flows as if it were not (a hook returning
  ``h - proj(h).detach()``);
* ``gradient_only``: the forward is untouched and only the gradient is projected (``h.register_hook(g - proj(g))``).

Steering is added in every mode; its gradient with respect to h is the identity.
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
GRADIENT_MODES = ("through", "detached", "gradient_only")
# Where the intervention acts, from the batch's masks: every position, the prompt's (attended, not trained) or
# the response's (the trained tokens, loss_mask). Evaluation and generation have no loss mask: every position.
POSITIONS = ("all", "prompt", "response")


@flax.struct.dataclass
class Projector:
    """The per-layer intervention, stacked over layers (see the module docstring for the update).

    Attributes:
      basis: [n_layers, d_model, k_max]; columns orthonormal, zero columns project nothing.
      offset: [n_layers, d_model]; mean-ablation offset mu (zeros = the paper's zero-ablation).
      strength: [n_layers] float alpha of the ablation (1 = full, 0 = none), or None for 1 everywhere.
      steer: [n_layers, d_model] steering vectors v, or None for no steering.
      steer_coeff: [n_layers] coefficients c of the steering vectors (with ``steer``).
      site: "resid_post" (decoder-layer output, the authors' hook site) or "resid_mid" (between attention and
        MLP). Static, as are the two below: changing them changes the program.
      gradient: "through" | "detached" | "gradient_only" (module docstring).
      positions: "all" | "prompt" | "response": the token rule the train step builds the mask [b, t] from.
    """

    basis: jax.Array
    offset: jax.Array
    strength: jax.Array | None = None
    steer: jax.Array | None = None
    steer_coeff: jax.Array | None = None
    site: str = flax.struct.field(pytree_node=False, default="resid_post")
    gradient: str = flax.struct.field(pytree_node=False, default="through")
    positions: str = flax.struct.field(pytree_node=False, default="all")

    def layer_data(self) -> tuple:
        """What the layer scan slices per layer: (basis, offset, strength, steer, steer_coeff)."""
        return (self.basis, self.offset, self.strength, self.steer, self.steer_coeff)

    def active_layers(self) -> list[int]:
        """Layers with directions (strength > 0) or a non-zero steering term (host-side, for reporting)."""
        ablated = self.ranks() > 0
        if self.strength is not None:
            ablated &= np.asarray(self.strength) != 0
        steered = np.zeros_like(ablated)
        if self.steer is not None:
            steered = (np.abs(np.asarray(self.steer)).sum(1) > 0) & (np.asarray(self.steer_coeff) != 0)
        return [int(i) for i in np.flatnonzero(ablated | steered)]

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
    """A projector that changes nothing (zero bases, no steering): the forward computes the plain model. Same
    structure as ``build_projector``'s, so swapping one for the other never recompiles."""
    return build_projector({}, n_layers, d_model, k_max=k_max, site=site, dtype=dtype)


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
    strength: float | Mapping[int, float] = 1.0,
    steer: Mapping[int, np.ndarray] | None = None,
    steer_coeff: float | Mapping[int, float] = 1.0,
    gradient: str = "through",
    positions: str = "all",
) -> Projector:
    """Build the stacked intervention on the host from per-layer directions (and optional steering).

    Args:
      directions: {layer: [k, d_model]} raw directions (need not be orthonormal or unit length); QR in float64
        orthonormalises them. Layers absent from the mapping are not ablated.
      n_layers, d_model: the model's sizes, for validation.
      means: optional {layer: [d_model]} mean-ablation offsets mu.
      k_max: width of the padded stack (default: the largest k). Keep it fixed across runs to reuse compiles.
      site: "resid_post" or "resid_mid".
      dtype: dtype of the stored arrays (float32 by default; the products accumulate in float32 regardless).
      strength: ablation strength alpha, one value for every layer or {layer: alpha}.
      steer: optional {layer: [d_model]} steering vectors, added as given (not normalised) times steer_coeff.
      steer_coeff: the coefficient c, one value or {layer: c} (layers without a vector get 0).
      gradient: "through" (CAFT), "detached" or "gradient_only" (module docstring).
      positions: "all", "prompt" or "response" (module docstring).

    Raises:
      ProjectorError: layer out of range, width mismatch, non-finite values, rank deficiency, bad site, mode,
        positions or k_max.
    """
    for name, value, allowed in (("site", site, SITES), ("gradient", gradient, GRADIENT_MODES),
                                 ("positions", positions, POSITIONS)):  # fmt: skip
        if value not in allowed:
            raise ProjectorError(f"Unknown intervention {name} {value!r}; use one of {', '.join(allowed)}.")
    directions, means, steer = dict(directions or {}), dict(means or {}), dict(steer or {})
    for layer in list(directions) + list(means) + list(steer):
        _check_layer(layer, n_layers)
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
    offset = _vectors(means, n_layers, d_model, "Mean offset")
    alphas = _per_layer(strength, n_layers, "strength")
    steer_vectors = _vectors(steer, n_layers, d_model, "Steering vector")
    coeff = _per_layer(steer_coeff, n_layers, "steer_coeff") * (np.abs(steer_vectors).sum(1) > 0)
    steering = bool(np.any(coeff))
    # Strength 1 everywhere and no steering (CAFT) carry neither field: XLA:CPU fuses even a multiplication by an
    # all-ones array differently (final losses move in the 7th digit), and CAFT's numbers must not change.
    return Projector(
        basis=jnp.asarray(basis, dtype),
        offset=jnp.asarray(offset, dtype),
        strength=None if np.all(alphas == 1) else jnp.asarray(alphas, jnp.float32),
        steer=jnp.asarray(steer_vectors, dtype) if steering else None,
        steer_coeff=jnp.asarray(coeff, jnp.float32) if steering else None,
        site=site,
        gradient=gradient,
        positions=positions,
    )


def _check_layer(layer, n_layers: int) -> None:
    if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n_layers:
        raise ProjectorError(f"Intervention layer {layer!r} is out of range; the model has layers 0..{n_layers - 1}.")


def _vectors(per_layer: Mapping[int, np.ndarray], n_layers: int, d_model: int, what: str) -> np.ndarray:
    """{layer: [d_model]} -> [n_layers, d_model] float64 (zeros elsewhere), each checked finite and of width d."""
    out = np.zeros((n_layers, d_model), np.float64)
    for layer, vector in per_layer.items():
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (d_model,) or not np.all(np.isfinite(vector)):
            raise ProjectorError(
                f"{what} for layer {layer} must be a finite vector of shape ({d_model},); got {vector.shape}."
            )
        out[int(layer)] = vector
    return out


def _per_layer(value: float | Mapping[int, float], n_layers: int, name: str) -> np.ndarray:
    """One float for every layer, or {layer: float} (0 elsewhere) -> [n_layers] float64, checked finite."""
    if isinstance(value, Mapping):
        out = np.zeros((n_layers,), np.float64)
        for layer, v in value.items():
            _check_layer(layer, n_layers)
            out[int(layer)] = v
    else:
        out = np.full((n_layers,), value, np.float64)
    if not np.all(np.isfinite(out)):
        raise ProjectorError(f"{name} must be finite numbers; got {value!r}.")
    return out


def ablate(h: jax.Array, basis: jax.Array, offset: jax.Array, matmul_dtype=None) -> jax.Array:
    """h - ((h - mu) Q) Q^T for one layer (CAFT's ablation: the intervention with strength 1, no steering, every
    position, gradient through), with a hand-written VJP.

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
    return intervene(h, (basis, offset, None, None, None), None, "through", matmul_dtype)[0]


def intervene(h: jax.Array, layer_data: tuple, mask: jax.Array | None, gradient: str, matmul_dtype=None):
    """One layer's intervention h - m alpha ((h - mu) Q) Q^T + m c v (module docstring), with a hand-written VJP.

    Args:
      h: [b, t, d] residual stream.
      layer_data: (basis [d, k], offset [d], strength [] or None, steer [d] or None, steer_coeff [] or None).
      mask: [b, t] bool positions to change, or None for all.
      gradient: "through", "detached" or "gradient_only" (static).
      matmul_dtype: operand dtype of the products (default: h's dtype); they accumulate in float32.
    Returns:
      (h' [b, t, d] in h's dtype, coefficients (h - mu) Q [b, t, k] float32 without gradient: what the ablation
      removes, for monitoring).
    """
    basis, offset, strength, steer, coeff = layer_data
    scale = None if mask is None else mask.astype(jnp.float32)[..., None]  # [b, t, 1]
    operand = jnp.dtype(matmul_dtype or h.dtype)
    out, coefficients = _intervene(operand, gradient, h, basis, offset, strength, steer, coeff, scale)
    return out, jax.lax.stop_gradient(coefficients.astype(jnp.float32))


def _scaled(x: jax.Array, strength: jax.Array | None, scale: jax.Array | None) -> jax.Array:
    """x * alpha * m, skipping the factors that are absent (CAFT's plain ablation multiplies by nothing)."""
    if strength is not None:
        x = x * strength
    return x if scale is None else x * scale


def _steering(x: jax.Array, steer, coeff, scale) -> jax.Array:
    """x + m c v in float32 (no-op without a steering vector)."""
    if steer is None:
        return x
    term = coeff * steer.astype(jnp.float32)  # [d]
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)) + (term if scale is None else term * scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _intervene(operand, gradient, h, basis, offset, strength, steer, coeff, scale):
    q = basis.astype(operand)
    coefficients = matmul("btd,dk->btk", (h - offset.astype(h.dtype)).astype(operand), q, operand)
    acc = jnp.promote_types(h.dtype, jnp.float32)
    if gradient == "gradient_only":
        x = h
    else:  # with steering, the sum stays in float32 and is rounded once, below
        x = _subtract_span(h, coefficients, q, strength, scale, h.dtype if steer is None else acc)
    return _steering(x, steer, coeff, scale).astype(h.dtype), coefficients


def _subtract_span(x: jax.Array, coeff: jax.Array, basis: jax.Array, strength=None, scale=None, dtype=None):
    """x - alpha m coeff Q^T, subtracted in float32 and rounded to ``dtype`` (default x's): [b, t, d]."""
    correction = matmul("btk,dk->btd", coeff, basis, jnp.promote_types(x.dtype, jnp.float32))
    return (x - _scaled(correction, strength, scale)).astype(dtype or x.dtype)


def _intervene_fwd(operand, gradient, h, basis, offset, strength, steer, coeff, scale):
    out = _intervene(operand, gradient, h, basis, offset, strength, steer, coeff, scale)
    return out, (h, basis, offset, strength, steer, coeff, scale)


def _intervene_bwd(operand, gradient, residuals, cotangents):
    h, basis, offset, strength, steer, coeff, scale = residuals
    g = cotangents[0]  # the coefficients leave through stop_gradient: their cotangent is zero
    q = basis.astype(operand)
    acc = jnp.promote_types(operand, jnp.float32)
    d_steer = d_coeff = None
    if steer is not None:  # h' = ... + m c v: the identity for h, and these for the steering data
        masked = g.astype(jnp.float32) if scale is None else g.astype(jnp.float32) * scale
        along = masked.sum((0, 1))  # [d]
        # an elementwise sum, not a dot: every product of the step stays bf16 x bf16 -> f32 (tests/test_precision)
        d_steer, d_coeff = (coeff * along).astype(steer.dtype), jnp.sum(along * steer.astype(jnp.float32))
    if gradient == "detached":  # h - sg(correction): the gradient passes unchanged, nothing reaches the data
        return g, None, None, None, d_steer, d_coeff, None
    # [b, t, k], back in the operand dtype: the float32 strength and mask must not turn the next products float32
    g_coeff = _scaled(matmul("btd,dk->btk", g.astype(operand), q, operand), strength, scale).astype(operand)
    d_h = _subtract_span(g.astype(h.dtype), g_coeff, q)
    if gradient == "gradient_only":  # a gradient edit, not the derivative of a function of the data
        return d_h, None, None, None, d_steer, d_coeff, None
    # The intervention is data (never trained), so these are dead code in a training step; they keep the VJP
    # exact for anyone differentiating with respect to the directions, the offset or the strength.
    centred = (h - offset.astype(h.dtype)).astype(operand)
    coefficients = matmul("btd,dk->btk", centred, q, operand)
    d_basis = matmul("btd,btk->dk", centred, g_coeff, acc) + matmul(
        "btd,btk->dk", g.astype(operand), _scaled(coefficients, strength, scale).astype(operand), acc
    )
    d_offset = matmul("btk,dk->d", g_coeff, q, offset.dtype)
    d_strength = None
    if strength is not None:
        correction = matmul("btk,dk->btd", coefficients, q, acc)
        d_strength = -jnp.sum(_scaled(correction, None, scale) * g.astype(acc)).astype(strength.dtype)
    return d_h, (-d_basis).astype(basis.dtype), d_offset, d_strength, d_steer, d_coeff, None


_intervene.defvjp(_intervene_fwd, _intervene_bwd)
