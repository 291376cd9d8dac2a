"""The one forward function of caft_jax: training, discovery, generation and evaluation all call ``forward``.

The model is a Flax NNX module (``CausalLM``) whose decoder layers are stacked ([n_layers, ...] parameters) and
run with ``jax.lax.scan``, so compile time does not grow with depth. At every jit boundary the module is split
into a static graph definition and a plain nested dict of arrays (``Model``), so jitted functions are pure over
ordinary pytrees. Everything a caller may vary between calls without recompiling (params, LoRA weights, the
ablation projector, the KV cache, tokens) is a traced argument; what changes the program (capture layers, remat
policy, LoRA scale) is static.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caft_jax.model.layers import DecoderLayer, LoraSettings, linear, rms_norm, rotary_tables, softcap
from caft_jax.model.spec import ModelSpec, rope_inverse_frequencies
from caft_jax.projector import Projector, intervene
from caft_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class CausalLM(nnx.Module):
    """Decoder-only LM for every supported family; family differences come from ``spec``.

    Parameters (nnx.Param): table [V, d]; layers.* [n_layers, ...]; final_norm [d]; lm_head [d, V] if untied.
    """

    def __init__(self, spec: ModelSpec, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        self.table = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (spec.vocab_size, spec.d_model)).astype(param_dtype)
        )
        self.layers = DecoderLayer(spec, n_stack=spec.n_layers, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        norm_init = jnp.zeros if spec.norm_offset else jnp.ones
        self.final_norm = nnx.Param(norm_init((spec.d_model,), param_dtype))
        if not spec.tie_embeddings:
            self.lm_head = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (spec.d_model, spec.vocab_size)).astype(param_dtype)
            )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array,
        attn_mask: jax.Array,
        projector: Projector | None,
        lora: dict | None,
        lora_settings: LoraSettings | None,
        cache: KVCache | None,
        capture: Capture | None,
        remat: str,
        rng: jax.Array | None,
        logits: bool,
        embeds: jax.Array | None = None,
        capture_delta: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        matmul_dtype=None,
        intervention_mask: jax.Array | None = None,
    ):
        spec, dtype = self.spec, self.dtype
        matmul_dtype = jnp.dtype(matmul_dtype or dtype)
        b, t = tokens.shape
        h = constrain(self._input_embeddings(tokens, embeds), "batch", None, None)
        inv_freq = jnp.asarray(rope_inverse_frequencies(spec), jnp.float32)
        rope = rotary_tables(positions, inv_freq, dtype)

        kv_valid = None
        if cache is not None:  # mark this step's slots, shared by every layer
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, attn_mask, (0, cache.index))

        layer_graph, layer_params = nnx.split(self.layers)
        xs = self._scan_inputs(layer_params, projector=projector, lora=lora, cache=cache, capture=capture, rng=rng)
        body = _layer_scan_body(
            layer_graph,
            rope=rope,
            attn_mask=attn_mask,
            segment_ids=segment_ids,
            kv_valid=kv_valid,
            cache=cache,
            capture=capture,
            capture_delta=capture_delta,
            projector=projector,
            intervention_mask=intervention_mask,
            lora_settings=lora_settings,
            matmul_dtype=matmul_dtype,
        )
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        captured0 = None
        if capture is not None:
            captured0 = jnp.zeros((len(capture.layers), b, t, spec.d_model), capture.dtype or dtype)
        (h, captured), (new_kv, stats) = jax.lax.scan(body, (h, captured0), xs)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=kv_valid, index=cache.index + t)
        out = None
        if logits:
            head = self.table[...] if spec.tie_embeddings else self.lm_head[...]  # [V, d] tied, else [d, V]
            out = constrain(head_logits(h, self.final_norm[...], head, spec, matmul_dtype), "batch", None, "vocab")
        return ForwardOutput(logits=out, cache=new_cache, captured=captured, hidden=h, intervention_stats=stats)

    def _input_embeddings(self, tokens: jax.Array, embeds: jax.Array | None) -> jax.Array:
        """The residual stream entering layer 0: ``embeds`` as given, else the table lookup (x sqrt(d) for Gemma)."""
        spec, dtype = self.spec, self.dtype
        if embeds is None:
            h = self.table[...][tokens].astype(dtype)  # [b, t, d]
            if spec.embed_scale:  # Gemma: the constant is rounded to the activation dtype first, as in HF.
                h = h * jnp.asarray(math.sqrt(spec.d_model), dtype)
            return h
        return embeds.astype(dtype)

    def _scan_inputs(
        self,
        layer_params,
        *,
        projector: Projector | None,
        lora: dict | None,
        cache: KVCache | None,
        capture: Capture | None,
        rng: jax.Array | None,
    ) -> dict:
        """What the layer scan slices per layer: parameters, window, capture slot, projector, LoRA, rng, cache."""
        n_layers = self.spec.n_layers
        capture_slots = np.full((n_layers,), -1, np.int32)
        if capture is not None:
            capture_slots[list(capture.layers)] = np.arange(len(capture.layers))
        return {
            "params": layer_params,
            "window": jnp.asarray(self.spec.windows, jnp.int32),
            "slot": jnp.asarray(capture_slots),
            "proj": None if projector is None else projector.layer_data(),
            "lora": lora,
            "rng": None if rng is None else jax.random.split(rng, n_layers),
            "cache": None if cache is None else (cache.k, cache.v),
        }


def _add_capture_delta(r: jax.Array, slot: jax.Array, capture_delta: jax.Array | None) -> jax.Array:
    """Add this layer's capture_delta (zero where the layer is not captured, slot < 0) to the residual r."""
    if capture_delta is None:
        return r
    delta = capture_delta[jnp.maximum(slot, 0)].astype(r.dtype)
    return r + jnp.where(slot >= 0, delta, jnp.zeros_like(delta))


def _layer_scan_body(
    layer_graph,
    *,
    rope,
    attn_mask: jax.Array,
    segment_ids: jax.Array | None,
    kv_valid: jax.Array | None,
    cache: KVCache | None,
    capture: Capture | None,
    capture_delta: jax.Array | None,
    projector: Projector | None,
    intervention_mask: jax.Array | None,
    lora_settings: LoraSettings | None,
    matmul_dtype,
):
    """The ``jax.lax.scan`` body over decoder layers: ((h, captured), per-layer inputs) -> ((h, captured), (new kv,
    intervention stats)).

    Per layer: the intervention at the projector's site, then capture_delta, then the write of the captured
    activation into its slot (layers without a slot keep the buffer unchanged).
    """
    mid_site = capture is not None and capture.site == "resid_mid"
    site = projector.site if projector is not None else None
    # Positions the monitor averages over: the real tokens the intervention acts on.
    watched = attn_mask if intervention_mask is None else attn_mask & intervention_mask
    stats = {}

    def hook(r, x):
        if x["proj"] is None:
            return r
        r, coefficients = intervene(r, x["proj"], intervention_mask, projector.gradient, matmul_dtype)
        stats["value"] = projection_stats(coefficients, x["proj"][0], watched)
        return r

    def body(carry, x):
        h, captured = carry
        layer = nnx.merge(layer_graph, x["params"])

        def mid_hook(r):
            r = hook(r, x) if site == "resid_mid" else r
            return _add_capture_delta(r, x["slot"], capture_delta) if mid_site else r

        layer_cache = None if cache is None else (*x["cache"], kv_valid, cache.index)
        h, mid, new_cache = layer(
            h,
            rope=rope,
            window=x["window"],
            attn_mask=attn_mask,
            segment_ids=segment_ids,
            cache=layer_cache,
            lora=x["lora"],
            lora_settings=lora_settings,
            rng=x["rng"],
            mid_hook=mid_hook,
            matmul_dtype=matmul_dtype,
        )
        if site == "resid_post":
            h = hook(h, x)
        if capture is not None and not mid_site:
            h = _add_capture_delta(h, x["slot"], capture_delta)
        h = constrain(h, "batch", None, None)
        if captured is not None:  # write this layer's activation into its slot, if it has one
            value = mid if capture.site == "resid_mid" else h
            slot = jnp.maximum(x["slot"], 0)
            keep = jnp.where(x["slot"] >= 0, value.astype(captured.dtype), captured[slot])
            captured = jax.lax.dynamic_update_index_in_dim(captured, keep, slot, 0)
        return (h, captured), (new_cache, stats.pop("value", None))

    return body


def projection_stats(coefficients: jax.Array, basis: jax.Array, watched: jax.Array) -> jax.Array:
    """[mean, max] of |(h - mu) . q| over the watched positions and the layer's directions (zero-padded basis
    columns left out): what the ablation removes, and whether the model routes around it. Float32 [2]."""
    active = jnp.any(basis != 0, axis=0).astype(jnp.float32)  # [k]
    weight = watched.astype(jnp.float32)[..., None] * active  # [b, t, k]
    size = jnp.abs(coefficients) * weight
    return jnp.stack([jnp.sum(size) / jnp.maximum(jnp.sum(weight), 1.0), jnp.max(size)])


@flax.struct.dataclass
class KVCache:
    """Preallocated KV cache stacked over layers so it rides the scan.

    Attributes:
      k, v: [n_layers, b, max_len, n_kv_heads, head_dim].
      valid: [b, max_len] bool, slots holding real (non-pad) tokens.
      index: scalar int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, spec: ModelSpec, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (spec.n_layers, batch, max_len, spec.n_kv_heads, spec.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which residual activations ``forward`` returns (static).

    Attributes:
      layers: layer indices; output ``captured`` is [len(layers), b, t, d_model] in this order.
      site: "resid_post" (decoder-layer output, after any ablation there) or "resid_mid".
      dtype: dtype of the captured activations (default: the compute dtype).
    """

    layers: tuple[int, ...]
    site: str = "resid_post"
    dtype: object = None


@flax.struct.dataclass
class ForwardOutput:
    """logits [b, t, V] float32 (None when logits=False); cache (KVCache or None); captured [n, b, t, d] or None;
    hidden [b, t, d]: the last layer's residual stream (after any ablation there), before the final norm;
    intervention_stats [n_layers, 2] float32 (mean, max |(h - mu) . q| before the intervention; None without a
    projector)."""

    logits: jax.Array | None
    cache: KVCache | None
    captured: jax.Array | None
    hidden: jax.Array | None = None
    intervention_stats: jax.Array | None = None


def head_logits(h: jax.Array, final_norm: jax.Array, head: jax.Array, spec: ModelSpec, matmul_dtype) -> jax.Array:
    """Final norm + LM head + soft-cap: h [..., d] -> float32 logits [..., V] (operands matmul_dtype).

    head is the embedding table [V, d] for tied embeddings, else lm_head [d, V].
    """
    out = linear(rms_norm(h, final_norm, spec), head, matmul_dtype, jnp.float32, w_transposed=spec.tie_embeddings)
    return softcap(out, spec.final_softcap)


def lm_head(model: Model, h: jax.Array) -> jax.Array:
    """Logits of selected hidden states: h [..., d] (``ForwardOutput.hidden`` rows) -> float32 [..., V].

    Applying the head to a few positions only (the answer position of a multiple-choice prompt) avoids the
    [b, t, V] logits, the largest tensor of the pass for big vocabularies.
    """
    spec, params = model.spec, model.params
    head = params["table"] if spec.tie_embeddings else params["lm_head"]  # [V, d] tied, else [d, V]
    return head_logits(h, params["final_norm"], head, spec, model.matmul_dtype or model.dtype)


@flax.struct.dataclass
class Model:
    """A model at the jit boundary: static NNX graph definition plus a plain nested dict of parameter arrays.

    ``spec`` and ``dtype`` (compute dtype: activations, residual stream) duplicate what the graphdef holds, for
    convenient host-side access. ``matmul_dtype`` is the operand dtype of every product (float32 accumulation
    always); None means ``dtype``. ``model.replace(matmul_dtype="bfloat16")`` keeps float32 activations, norms and
    softmax and runs the products on bf16 operands: the mixed precision that uses bf16 matrix units (AMX, tensor
    cores, MXUs) without storing bf16 activations.
    """

    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)
    params: dict
    spec: ModelSpec = flax.struct.field(pytree_node=False)
    dtype: object = flax.struct.field(pytree_node=False, default=jnp.float32)
    matmul_dtype: object = flax.struct.field(pytree_node=False, default=None)

    def replace_params(self, params: dict) -> Model:
        return self.replace(params=params)


def init_model(
    spec: ModelSpec,
    *,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    matmul_dtype=None,
    seed: int = 0,
    abstract: bool = False,
) -> Model:
    """Create a model with random weights (N(0, 0.02) kernels), or only its shapes when ``abstract``.

    Args:
      spec: the architecture.
      param_dtype: storage dtype of parameters (e.g. float32 master weights, or bfloat16).
      dtype: compute dtype of activations and matmuls (softmax and norms always run in float32).
      matmul_dtype: operand dtype of the products if not ``dtype`` (e.g. bfloat16 with float32 activations).
      abstract: return jax.ShapeDtypeStruct leaves (no memory), e.g. to build shardings or compile ahead of time.
    """
    make = lambda: CausalLM(spec, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(seed))  # noqa: E731
    module = nnx.eval_shape(make) if abstract else make()
    graphdef, state = nnx.split(module)
    matmul_dtype = None if matmul_dtype is None else jnp.dtype(matmul_dtype)
    return Model(graphdef=graphdef, params=nnx.to_pure_dict(state), spec=spec, dtype=dtype, matmul_dtype=matmul_dtype)


def embed_tokens(model: Model, tokens: jax.Array) -> jax.Array:
    """The residual-stream input for ``tokens`` [b, t]: table lookup, times sqrt(d) for Gemma. [b, t, d]."""
    h = model.params["table"][tokens].astype(model.dtype)
    if model.spec.embed_scale:
        h = h * jnp.asarray(math.sqrt(model.spec.d_model), model.dtype)
    return h


def default_positions(attn_mask: jax.Array) -> jax.Array:
    """Position ids [b, t] for left-padded rows: real tokens count 0, 1, ...; padding gets 0."""
    return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position ids [b, t] of packed rows: each segment (a run of equal ids) counts 0, 1, ... from its first token."""
    col = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return col - jax.lax.cummax(jnp.where(starts, col, 0), axis=1)


def forward(
    model: Model,
    tokens: jax.Array,
    *,
    attn_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    projector: Projector | None = None,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    cache: KVCache | None = None,
    capture: Capture | None = None,
    remat: str = "none",
    rng: jax.Array | None = None,
    logits: bool = True,
    embeds: jax.Array | None = None,
    capture_delta: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    intervention_mask: jax.Array | None = None,
) -> ForwardOutput:
    """Run the decoder. Pure: call it under ``jax.jit`` (see ``jit_forward``) or inside a jitted step.

    Args:
      model: graph definition + parameter dict.
      tokens: [b, t] int32 token ids (left-padded batches: padding first).
      attn_mask: [b, t] bool, True for real tokens (default: all True).
      positions: [b, t] rotary position ids (default: from attn_mask; required with a cache after prefill).
      projector: the training-time intervention (concept ablation, steering; traced, so a new value never
        recompiles); None runs the plain model.
      lora: LoRA weights {"attn"|"mlp": {kernel: {"a": [L, in, r], "b": [L, r, out]}}}, or None.
      lora_settings: static LoRA scale / dropout (required with lora).
      cache: KVCache to read and extend (generation), or None.
      capture: which residual activations to return.
      remat: "none" | "full" | "dots" rematerialisation policy per layer (training memory).
      rng: PRNG key for LoRA dropout (None disables dropout).
      logits: skip the LM head when False (capture-only passes).
      embeds: [b, t, d] input embeddings used instead of looking up ``tokens`` (for gradients with respect to
        the inputs). They enter the residual stream as given: like HF's inputs_embeds (transformers 5), they
        already include Gemma's sqrt(d) scale (see ``embed_tokens``).
      capture_delta: [len(capture.layers), b, t, d] added to the residual at each captured site (after any
        ablation there, before capturing). Its gradient at zero is d output / d activation, which is what SAE
        attribution needs; requires ``capture``.
      segment_ids: [b, t] int32 for packed rows (``data.make_packed_batches``): tokens attend only to earlier
        tokens of their own segment and positions restart at each segment (default: from the segment ids), so
        each packed example computes what it computes alone. 0 marks padding (with attn_mask False). No cache.
      intervention_mask: [b, t] bool positions the projector acts on (default: all; see
        ``caft_jax.projector.POSITIONS`` for the rule the train step builds it with).
    Returns:
      ForwardOutput(logits [b, t, V] float32, cache, captured [n, b, t, d]).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    if attn_mask is None:
        attn_mask = jnp.ones(tokens.shape, bool)
    attn_mask = attn_mask.astype(bool)
    if segment_ids is not None and cache is not None:
        raise ValueError("segment_ids (packed rows) are for training and scoring; generation with a cache has none")
    if positions is None:
        positions = default_positions(attn_mask) if segment_ids is None else segment_positions(segment_ids)
    if capture_delta is not None and capture is None:
        raise ValueError("capture_delta needs a capture spec naming the layers it applies to")
    if lora is not None and lora_settings is None:
        raise ValueError("lora weights were given without lora_settings (scale, dropout)")
    module = nnx.merge(model.graphdef, model.params)
    return module(
        tokens,
        positions=positions,
        attn_mask=attn_mask,
        projector=projector,
        lora=lora,
        lora_settings=lora_settings,
        cache=cache,
        capture=capture,
        remat=remat,
        rng=rng,
        logits=logits,
        embeds=embeds,
        capture_delta=capture_delta,
        segment_ids=segment_ids,
        matmul_dtype=model.matmul_dtype,
        intervention_mask=None if intervention_mask is None else intervention_mask.astype(bool),
    )


jit_forward = jax.jit(forward, static_argnames=("lora_settings", "capture", "remat", "logits"))
