"""Decoder building blocks as Flax NNX modules whose parameters carry a leading layer axis.

Every module here is created once for the whole stack (parameters [n_layers, ...]) and called inside
``jax.lax.scan`` on one layer's slice: ``nnx.merge(graphdef, state_slice)`` rebuilds the module with unstacked
parameters, so ``__call__`` is written for a single layer. Einsum letters: b batch, t query positions, s key
positions, d d_model, f d_ff, k kv heads, g query heads per kv head, h head_dim, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from caft_jax.model.spec import ModelSpec

# LoRA target name -> (owning submodule, kernel name). Targets follow PEFT's q/k/v/o/gate/up/down.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attn", "q_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}

_PROJ_IDS = {name: i for i, (_, name) in enumerate(LORA_TARGETS.values())}
CAUSAL_BLOCK = 128  # query rows per block of the cache-free (training) attention
_BIG_NEGATIVE = -1e30  # finite, so fully-masked (padding) query rows give a uniform softmax instead of NaN


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Static LoRA settings the forward needs: output scale and input dropout rate."""

    scale: float
    dropout: float = 0.0


def rms_norm(x: jax.Array, weight: jax.Array, spec: ModelSpec) -> jax.Array:
    """RMSNorm with statistics in fp32. x [..., d], weight [d]; returns x's dtype.

    Llama casts the normalised value back before scaling by w; Gemma scales by (1 + w) in fp32 and casts after.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + spec.norm_eps)
    if spec.norm_scale_in_fp32:
        return (xf * (spec.norm_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return (spec.norm_offset + weight.astype(x.dtype)) * xf.astype(x.dtype)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [b, t, head_dim] for the rotate-half convention, computed in fp32 then cast like HF."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [b, t, h/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [b, t, h]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [b, t, ..., h]; cos/sin [b, t, h] broadcast over the head axes."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    extra = (None,) * (x.ndim - 3)
    cos = cos[:, :, *extra, :]
    sin = sin[:, :, *extra, :]
    return x * cos + rotated * sin


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap); identity when cap is 0."""
    return x if not cap else cap * jnp.tanh(x / cap)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, kind: str) -> nnx.Param:
    if kind == "normal":  # HF's initializer_range default
        return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))
    if kind == "ones":
        return nnx.Param(jnp.ones(shape, dtype))
    return nnx.Param(jnp.zeros(shape, dtype))


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis with masked-out entries at a large negative logit (mask broadcasts to logits)."""
    return jax.nn.softmax(jnp.where(mask, logits, _BIG_NEGATIVE), axis=-1)


def _attend(q, keys, values, mask, spec: ModelSpec, matmul_dtype) -> jax.Array:
    """Softmax attention: q [b, t, k, g, h], keys/values [b, s, k, h], mask [b, 1, 1, t, s] -> [b, t, k, g, h].

    The four products take ``matmul_dtype`` operands and accumulate in float32; the output is in q's dtype.
    """
    core = _attention_core(float(spec.query_scale), float(spec.attn_softcap), jnp.dtype(matmul_dtype))
    return core(q, keys, values, mask)


def _scores(q, keys, mask, scale: float, cap: float, operand):
    """Soft-capped logits z [b, k, g, t, s] (fp32) and probabilities p = softmax(masked z)."""
    logits = softcap(matmul("btkgh,bskh->bkgts", q.astype(operand), keys.astype(operand), jnp.float32) * scale, cap)
    return logits, masked_softmax(logits, mask)


@functools.cache
def _attention_core(scale: float, cap: float, operand):
    """The attention product as a custom VJP that saves only q, keys, values and the mask.

    Autodiff would save the probabilities of every layer ([b, H, t, s] fp32, the largest residual of a training
    step) and XLA's scan zero-fills and copies that stack each step; the backward here recomputes them from q and
    keys instead (one extra q.k product), as flash attention does, with the standard softmax gradient
    dz = p * (dp - sum(p * dp)) and, under a soft-cap c, the chain factor 1 - (z / c)^2.
    """

    @jax.custom_vjp
    def core(q, keys, values, mask):
        _, probs = _scores(q, keys, mask, scale, cap, operand)
        return matmul("bkgts,bskh->btkgh", probs.astype(operand), values.astype(operand), q.dtype)

    def fwd(q, keys, values, mask):
        return core(q, keys, values, mask), (q, keys, values, mask)

    def bwd(residuals, d_out):
        q, keys, values, mask = residuals
        logits, probs = _scores(q, keys, mask, scale, cap, operand)
        d_out = d_out.astype(operand)
        d_values = matmul("bkgts,btkgh->bskh", probs.astype(operand), d_out, values.dtype)  # [b, s, k, h]
        d_probs = matmul("btkgh,bskh->bkgts", d_out, values.astype(operand), jnp.float32)
        d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))  # [b, k, g, t, s]
        d_logits = jnp.where(mask, d_logits, 0.0)  # masked logits are constants (matters for all-masked rows)
        if cap:
            d_logits = d_logits * (1.0 - jnp.square(logits / cap))
        d_logits = (d_logits * scale).astype(operand)
        d_q = matmul("bkgts,bskh->btkgh", d_logits, keys.astype(operand), q.dtype)  # [b, t, k, g, h]
        d_keys = matmul("bkgts,btkgh->bskh", d_logits, q.astype(operand), keys.dtype)  # [b, s, k, h]
        return d_q, d_keys, d_values, None

    core.defvjp(fwd, bwd)
    return core


def matmul(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """einsum(spec, a, b) with float32 accumulation, rounded once to out_dtype.

    Every product of the model goes through here: bf16 operands then accumulate in float32, which is also the only
    form XLA:CPU runs on the AMX bf16 units (a bf16 x bf16 -> bf16 dot runs at float32 speed or below). For float32
    operands it is the plain einsum.
    """
    accumulate = jnp.promote_types(a.dtype, jnp.float32)  # float64 stays float64
    return jnp.einsum(spec, a, b, preferred_element_type=accumulate).astype(out_dtype)


def linear(x: jax.Array, w: jax.Array, matmul_dtype=None, out_dtype=None, *, w_transposed: bool = False):
    """x [..., in] @ w [in, out] -> [..., out] in out_dtype (default: x's dtype), with a hand-written VJP.

    Both operands are cast to ``matmul_dtype`` (default: x's dtype) for the products, which accumulate in float32
    (``matmul``); w keeps its own dtype outside (float32 master weights get float32 gradients, never rounded to
    bf16). The LM head asks for float32 logits; its float32 cotangent is rounded to the operand dtype for the two
    backward products, as torch's bf16 autograd does. ``w_transposed``: w is [out, in] (a tied embedding table as
    the head), and its gradient comes out in that layout, with no transpose after the product (see _linear_bwd).
    """
    return _linear(jnp.dtype(matmul_dtype or x.dtype), jnp.dtype(out_dtype or x.dtype), w_transposed, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear(operand, out_dtype, w_transposed, x, w):
    spec = "...i,oi->...o" if w_transposed else "...i,io->...o"
    return matmul(spec, x.astype(operand), w.astype(operand), out_dtype)


def _linear_fwd(operand, out_dtype, w_transposed, x, w):
    return _linear(operand, out_dtype, w_transposed, x, w), (x, w)


def _linear_bwd(operand, out_dtype, w_transposed, residuals, g):
    """The products of autodiff in another operand order: dW = einsum(x, g) with the layer input first.

    Autodiff's (g^T x)^T made XLA:CPU materialise a transposed copy of every [b, t, out] cotangent, about a quarter
    of a training step (benchmarks/RESULTS.md). dW contracts over the b*t rows of both operands, so XLA:CPU copies
    one operand transposed: in float32, let that be the narrower one (x for a projection into a wider space, g for
    LoRA's rank-r A). In bf16 the layer input always goes first: XLA folds the transpose of (g^T x)^T into a dot
    that contracts its left operand's leading axis, which YNNPACK does not take, and the fallback kernel has no
    bf16 x bf16 -> float32 form ("Unsupported element type for DotThunk::Execute"). Under LoRA the frozen W's
    gradient is dead code.
    """
    x, w = residuals
    g, xo = g.astype(operand), x.astype(operand)
    if w_transposed:
        dx = matmul("...o,oi->...i", g, w.astype(operand), x.dtype)  # [..., in]
        return dx, matmul("...o,...i->oi", g, xo, w.dtype)  # [out, in]
    dx = matmul("...o,io->...i", g, w.astype(operand), x.dtype)  # [..., in]
    if operand == jnp.float32 and x.shape[-1] > g.shape[-1]:
        dw = matmul("...o,...i->oi", g, xo, w.dtype).T  # [out, in] -> [in, out]
    else:
        dw = matmul("...i,...o->io", xo, g, w.dtype)  # [in, out]
    return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


class Linears(nnx.Module):
    """Shared helper: a projection x @ W (+ LoRA) used by attention and MLP.

    Each kernel is its own product: concatenating q/k/v (and gate/up, and their LoRA A's) into one wide product
    each was measured slower on XLA:CPU (benchmarks/RESULTS.md, "fused projections").
    """

    dtype: Any

    def project(self, x: jax.Array, name: str, lora: dict | None, lora_settings, rng, matmul_dtype) -> jax.Array:
        """x [b, t, in] @ W [in, out] -> [b, t, out], plus scale * dropout(x) @ A @ B when `name` has LoRA.

        The products take ``matmul_dtype`` operands (``linear``); x and the result are in the compute dtype.
        """
        y = linear(x, getattr(self, name)[...], matmul_dtype)
        if lora is not None and name in lora:
            a, b = lora[name]["a"], lora[name]["b"]  # [in, r], [r, out]
            if lora_settings.dropout and rng is not None:
                key = jax.random.fold_in(rng, _PROJ_IDS[name])  # a fixed id: str hash() is salted per process
                keep = jax.random.bernoulli(key, 1 - lora_settings.dropout, x.shape)
                x = jnp.where(keep, x / (1 - lora_settings.dropout), 0).astype(x.dtype)
            down = linear(x, a, matmul_dtype)  # [b, t, r]
            y = y + (lora_settings.scale * linear(down, b, matmul_dtype)).astype(y.dtype)
        return y


class Attention(Linears):
    """Grouped-query self-attention with rotary embeddings, optional soft-cap, sliding window and KV cache."""

    def __init__(self, spec: ModelSpec, *, n_stack: int, param_dtype, dtype, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        d, L = spec.d_model, (n_stack,)
        self.q_proj = _param(rngs, L + (d, spec.q_dim), param_dtype, "normal")
        self.k_proj = _param(rngs, L + (d, spec.kv_dim), param_dtype, "normal")
        self.v_proj = _param(rngs, L + (d, spec.kv_dim), param_dtype, "normal")
        self.o_proj = _param(rngs, L + (spec.q_dim, d), param_dtype, "normal")
        if spec.qkv_bias:
            self.q_bias = _param(rngs, L + (spec.q_dim,), param_dtype, "zeros")
            self.k_bias = _param(rngs, L + (spec.kv_dim,), param_dtype, "zeros")
            self.v_bias = _param(rngs, L + (spec.kv_dim,), param_dtype, "zeros")

    def __call__(self, x, *, rope, window, attn_mask, segment_ids, cache, lora, lora_settings, rng, matmul_dtype):
        """One layer's attention.

        Args:
          x: [b, t, d] normalised input.
          rope: (cos, sin), each [b, t, head_dim].
          window: scalar int32 sliding window (0 = global).
          attn_mask: [b, t] bool, True for real tokens.
          segment_ids: None, or [b, t] int32 of packed rows: a query sees only keys of its own segment.
          cache: None, or (k [b, S, K, h], v [b, S, K, h], kv_valid [b, S] bool, index scalar int32): the
            new keys/values are written at slots index..index+t-1, the query at row i sits at slot index+i, and
            kv_valid (already updated by the caller for this step) marks the slots holding real tokens.
          matmul_dtype: operand dtype of every product (float32 accumulation).
        Returns:
          ([b, t, d] output, updated (k, v) or None).
        """
        spec = self.spec
        b, t, _ = x.shape
        groups = spec.n_heads // spec.n_kv_heads
        q = self.project(x, "q_proj", lora, lora_settings, rng, matmul_dtype)
        k = self.project(x, "k_proj", lora, lora_settings, rng, matmul_dtype)
        v = self.project(x, "v_proj", lora, lora_settings, rng, matmul_dtype)
        if spec.qkv_bias:
            q = q + self.q_bias[...].astype(self.dtype)
            k = k + self.k_bias[...].astype(self.dtype)
            v = v + self.v_bias[...].astype(self.dtype)
        q = q.reshape(b, t, spec.n_kv_heads, groups, spec.head_dim)  # [b, t, k, g, h]
        k = k.reshape(b, t, spec.n_kv_heads, spec.head_dim)  # [b, t, k, h]
        v = v.reshape(b, t, spec.n_kv_heads, spec.head_dim)  # [b, t, k, h]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if cache is None:
            keys, values, kv_valid, q_slot, new_cache = k, v, attn_mask, jnp.arange(t), None
        else:
            cache_k, cache_v, kv_valid, index = cache
            keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            q_slot, new_cache = index + jnp.arange(t), (keys, values)
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        kv_slot = jnp.arange(keys.shape[1])

        causal = kv_slot[None, :] <= q_slot[:, None]  # [t, s]
        in_window = (window == 0) | (q_slot[:, None] - kv_slot[None, :] < window)
        mask = (causal & in_window)[None, None, None] & kv_valid[:, None, None, None, :]  # [b, 1, 1, t, s]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
        block = CAUSAL_BLOCK
        if cache is None and t > block and t % block == 0:
            # Without a cache, query block i sees no key past its own block: skip the all-masked blocks above the
            # diagonal (t = 256: 3/4 of the square's products and probabilities are computed; t = 2048: 17/32). Exact.
            parts = [
                _attend(
                    q[:, i : i + block],
                    keys[:, : i + block],
                    values[:, : i + block],
                    mask[..., i : i + block, : i + block],
                    spec,
                    matmul_dtype,
                )
                for i in range(0, t, block)
            ]
            out = jnp.concatenate(parts, axis=1)  # [b, t, k, g, h]
        else:
            out = _attend(q, keys, values, mask, spec, matmul_dtype)
        out = out.reshape(b, t, spec.q_dim)  # [b, t, H*h]
        return self.project(out, "o_proj", lora, lora_settings, rng, matmul_dtype), new_cache


class MLP(Linears):
    """Gated MLP: down(act(gate(x)) * up(x)), act = SiLU or tanh-approximated GELU."""

    def __init__(self, spec: ModelSpec, *, n_stack: int, param_dtype, dtype, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        d, f, L = spec.d_model, spec.d_ff, (n_stack,)
        self.gate_proj = _param(rngs, L + (d, f), param_dtype, "normal")
        self.up_proj = _param(rngs, L + (d, f), param_dtype, "normal")
        self.down_proj = _param(rngs, L + (f, d), param_dtype, "normal")

    def __call__(self, x, *, lora, lora_settings, rng, matmul_dtype):
        """x [b, t, d] -> [b, t, d]."""
        gate = self.project(x, "gate_proj", lora, lora_settings, rng, matmul_dtype)  # [b, t, f]
        act = jax.nn.silu(gate) if self.spec.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        up = self.project(x, "up_proj", lora, lora_settings, rng, matmul_dtype)  # [b, t, f]
        return self.project(act * up, "down_proj", lora, lora_settings, rng, matmul_dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block; Gemma-2 adds post-sublayer ("sandwich") norms before each residual add."""

    def __init__(self, spec: ModelSpec, *, n_stack: int, param_dtype, dtype, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        kw = dict(n_stack=n_stack, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.attn = Attention(spec, **kw)
        self.mlp = MLP(spec, **kw)
        norm_init = "zeros" if spec.norm_offset else "ones"
        shape = (n_stack, spec.d_model)
        self.attn_norm = _param(rngs, shape, param_dtype, norm_init)
        self.mlp_norm = _param(rngs, shape, param_dtype, norm_init)
        if spec.sandwich_norms:
            self.post_attn_norm = _param(rngs, shape, param_dtype, norm_init)
            self.post_mlp_norm = _param(rngs, shape, param_dtype, norm_init)

    def __call__(
        self, h, *, rope, window, attn_mask, segment_ids, cache, lora, lora_settings, rng, mid_hook, matmul_dtype
    ):
        """One decoder layer. h [b, t, d] -> (h [b, t, d] at resid_post, resid_mid [b, t, d], new cache).

        `mid_hook(h)` is applied to the residual between attention and MLP (resid_mid): the ablation site option.
        `matmul_dtype` is the operand dtype of every product.
        """
        spec = self.spec
        lora_attn = None if lora is None else lora.get("attn")
        lora_mlp = None if lora is None else lora.get("mlp")
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        attn_out, new_cache = self.attn(
            rms_norm(h, self.attn_norm[...], spec),
            rope=rope,
            window=window,
            attn_mask=attn_mask,
            segment_ids=segment_ids,
            cache=cache,
            lora=lora_attn,
            lora_settings=lora_settings,
            rng=rngs[0],
            matmul_dtype=matmul_dtype,
        )
        if spec.sandwich_norms:
            attn_out = rms_norm(attn_out, self.post_attn_norm[...], spec)
        h = mid_hook(h + attn_out)
        mid = h
        mlp_out = self.mlp(
            rms_norm(h, self.mlp_norm[...], spec),
            lora=lora_mlp,
            lora_settings=lora_settings,
            rng=rngs[1],
            matmul_dtype=matmul_dtype,
        )
        if spec.sandwich_norms:
            mlp_out = rms_norm(mlp_out, self.post_mlp_norm[...], spec)
        return h + mlp_out, mid, new_cache
