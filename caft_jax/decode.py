"""The jitted generation programs: prefill and decode over a preallocated KV cache, and token selection.

One call of ``generate_tokens`` handles one batch:

1. prefill: the left-padded prompt batch, minus its last column, is written into a ``KVCache`` of length
   ``prompt bucket + max_new_tokens`` (no logits are computed: the LM head over a whole prompt is the largest
   tensor of the pass and only the last position is needed);
2. decode: a ``jax.lax.while_loop`` feeds one token per row per step (step 0 feeds the prompt's last token), picks
   the next token (greedy, temperature or nucleus sampling, per row) and stops when every row has emitted an EOS
   token or used its token budget.

``prefill_state`` and ``decode_state`` are the same two halves as separate programs, so a server can read the
tokens every few steps and stream them. Left padding puts every row's last prompt token in the same column, so one
slice update serves the batch; each row's rotary positions continue from its own real-token count. The projector
(test-time ablation), LoRA weights and every sampling setting are traced arguments, so none of them recompiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import KVCache, Model, default_positions, forward
from caft_jax.projector import Projector

# ---------------------------------------------------------------------------------------------------------------
# Token selection
# ---------------------------------------------------------------------------------------------------------------


def nucleus_logits(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside each row's top-p nucleus to -inf. logits [b, V] float32, top_p scalar or [b] -> [b, V].

    The nucleus is the most likely tokens, in order, up to and including the one whose cumulative probability
    first reaches top_p (as transformers' TopPLogitsWarper); the most likely token is always kept.
    """
    top_p = jnp.reshape(top_p, (-1, 1))  # [1 or b, 1]
    desc = -jnp.sort(-logits, axis=-1)  # [b, V] descending
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # [b]
    cutoff = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [b, 1] smallest kept logit
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def select_tokens(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: jax.Array
) -> jax.Array:
    """Next token per row. logits [b, V] float32, keys [b] typed PRNG keys; temperature (> 0), top_p and greedy
    (bool) are per row [b], so requests with different settings share one batch and one compiled program.

    Only what some row needs runs: a batch of greedy rows takes the argmax alone, and the nucleus sort (over the
    whole vocabulary, every step) runs only when some sampled row has top_p < 1. Returns [b] int32.
    """
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(lg):
        scaled = lg / temperature[:, None]
        needs_nucleus = ~greedy & (top_p < 1.0)
        scaled = jax.lax.cond(
            jnp.any(needs_nucleus),
            lambda x: jnp.where(needs_nucleus[:, None], nucleus_logits(x, top_p), x),
            lambda x: x,
            scaled,
        )
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(greedy, argmax, drawn)

    return jax.lax.cond(jnp.all(greedy), lambda lg: argmax, sampled, logits)


def token_logprobs(logits: jax.Array, chosen: jax.Array, k: int) -> dict[str, jax.Array]:
    """Log-probabilities of the model's distribution (before temperature or top-p, as OpenAI reports them).

    logits [b, V] float32, chosen [b] int32 -> {"logprob": [b], "top_ids": [b, k] int32, "top_logprobs": [b, k]}.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logp, k)
    return {
        "logprob": jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0],
        "top_ids": top_ids.astype(jnp.int32),
        "top_logprobs": top_logprobs,
    }


# ---------------------------------------------------------------------------------------------------------------
# The jitted prefill + decode loop
# ---------------------------------------------------------------------------------------------------------------


def _prefill(model, tokens, attn_mask, row_valid, cache, pad_id, adapters, max_new_tokens, record_logits,
             top_logprobs) -> dict:  # fmt: skip
    """The decode loop's initial state: the prompt (minus its last column) written into the cache."""
    b = tokens.shape[0]
    positions = default_positions(attn_mask)
    # A cache reused from the previous batch keeps stale keys and values; clearing ``valid`` hides them all.
    cache = cache.replace(valid=jnp.zeros_like(cache.valid), index=jnp.zeros((), jnp.int32))
    # Prefill all but the last column; the loop's first step feeds the last prompt token and so yields the logits
    # of the first new token without ever computing the LM head over the prompt.
    cache = forward(
        model,
        tokens[:, :-1],
        attn_mask=attn_mask[:, :-1],
        positions=positions[:, :-1],
        cache=cache,
        logits=False,
        **adapters,
    ).cache
    state = {
        "step": jnp.zeros((), jnp.int32),
        "cache": cache,
        "token": tokens[:, -1],
        "position": positions[:, -1],
        "done": ~row_valid,
        "stopped": jnp.zeros((b,), bool),
        "lengths": jnp.zeros((b,), jnp.int32),
        "out": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
    }
    if record_logits:
        state["logits"] = jnp.zeros((b, max_new_tokens, model.spec.vocab_size), jnp.float32)
    if top_logprobs is not None:
        k = top_logprobs
        state["logprob"] = jnp.zeros((b, max_new_tokens), jnp.float32)
        state["top_ids"] = jnp.zeros((b, max_new_tokens, k), jnp.int32)
        state["top_logprobs"] = jnp.zeros((b, max_new_tokens, k), jnp.float32)
    return state


def _decode(model, state, stop_at, keys, eos_ids, pad_id, temperature, top_p, greedy, limits, adapters,
            top_logprobs) -> dict:  # fmt: skip
    """Run the decode loop from ``state`` until step ``stop_at`` or until every row is done."""
    b = state["token"].shape[0]

    def cond(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        out = forward(
            model,
            s["token"][:, None],
            attn_mask=jnp.ones((b, 1), bool),
            positions=s["position"][:, None],
            cache=s["cache"],
            **adapters,
        )
        logits = out.logits[:, 0]  # [b, V]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        chosen = select_tokens(logits, step_keys, temperature, top_p, greedy)
        new = {
            "step": step + 1,
            "cache": out.cache,
            "token": chosen,
            "position": s["position"] + 1,
        }
        live = ~s["done"]
        emitted = jnp.where(live, chosen, pad_id)
        is_eos = jnp.any(emitted[:, None] == eos_ids[None, :], axis=-1) & live
        new["out"] = jax.lax.dynamic_update_slice(s["out"], emitted[:, None], (0, step))
        new["lengths"] = s["lengths"] + live.astype(jnp.int32)
        new["stopped"] = s["stopped"] | is_eos
        new["done"] = s["done"] | is_eos | (new["lengths"] >= limits)
        if "logits" in s:
            new["logits"] = jax.lax.dynamic_update_slice(s["logits"], logits[:, None], (0, step, 0))
        if top_logprobs is not None:
            for name, value in token_logprobs(logits, chosen, top_logprobs).items():
                at = (0, step) + (0,) * (value.ndim - 1)
                new[name] = jax.lax.dynamic_update_slice(s[name], value[:, None], at)
        return new

    return jax.lax.while_loop(cond, body, state)


def _result(final: dict) -> dict:
    result = {k: final[k] for k in ("lengths", "stopped", "cache")}
    result["tokens"] = final["out"]
    for name in ("logits", "logprob", "top_ids", "top_logprobs"):
        if name in final:
            result[name] = final[name]
    return result


@functools.partial(
    jax.jit,
    static_argnames=("lora_settings", "max_new_tokens", "record_logits", "top_logprobs"),
    donate_argnames=("cache",),
)
def generate_tokens(
    model: Model,
    tokens: jax.Array,
    attn_mask: jax.Array,
    row_valid: jax.Array,
    keys: jax.Array,
    cache: KVCache,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    greedy: jax.Array,
    limits: jax.Array,
    projector: Projector | None = None,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    *,
    max_new_tokens: int,
    record_logits: bool = False,
    top_logprobs: int | None = None,
) -> dict[str, jax.Array]:
    """Prefill a left-padded prompt batch and decode until every row stops.

    Args:
      model: the model (params traced, graph static).
      tokens: [b, t] int32 prompt ids, LEFT-padded; every valid row has a real token in column t - 1.
      attn_mask: [b, t] bool, True on real tokens.
      row_valid: [b] bool; False rows (filling a partial batch) count as finished from the start.
      keys: [b] typed PRNG keys, one per row (step s samples with fold_in(key, s)).
      cache: KVCache of shape (b, >= t + max_new_tokens - 1), fresh from ``KVCache.zeros`` or the "cache" output of
        the previous call (its contents are ignored); donated, and returned again, so a run of same-shaped batches
        decodes in one buffer instead of allocating a cache per batch.
      eos_ids: [n_eos] int32 stop tokens (-1 entries match nothing).
      pad_id: scalar int32 written after a row stops.
      temperature, top_p: [b] float32 (temperature > 0); greedy: [b] bool; limits: [b] int32, each row's own
        token budget (<= max_new_tokens). All traced, per row: changing them does not recompile.
      projector, lora, lora_settings: as in ``forward``; the same values act in prefill and in every decode step.
      max_new_tokens, record_logits, top_logprobs: static. ``top_logprobs`` k (0..20) records each chosen token's
        log-probability and the k most likely tokens of every step; None records neither.
    Returns:
      {"tokens": [b, max_new_tokens] int32 (pad after a row stops; the EOS itself is kept),
       "lengths": [b] int32 generated tokens per row (EOS included),
       "stopped": [b] bool, True where the row emitted an EOS,
       "cache": the KVCache buffers, to donate to the next call of the same shape,
       "logits": [b, max_new_tokens, V] float32 logits each token was chosen from (only with record_logits),
       "logprob": [b, max_new_tokens], "top_ids" [b, max_new_tokens, k] int32, "top_logprobs" [b, max_new_tokens, k]
         (only with top_logprobs)}.
    """
    adapters = dict(projector=projector, lora=lora, lora_settings=lora_settings)
    state = _prefill(model, tokens, attn_mask, row_valid, cache, pad_id, adapters, max_new_tokens, record_logits,
                     top_logprobs)  # fmt: skip
    final = _decode(model, state, max_new_tokens, keys, eos_ids, pad_id, temperature, top_p, greedy, limits,
                    adapters, top_logprobs)  # fmt: skip
    return _result(final)


# The same two halves as separate programs, for streaming: the host reads the tokens after every few steps.
@functools.partial(
    jax.jit, static_argnames=("lora_settings", "max_new_tokens", "top_logprobs"), donate_argnames=("cache",)
)
def prefill_state(model, tokens, attn_mask, row_valid, cache, pad_id, projector=None, lora=None, lora_settings=None,
                  *, max_new_tokens: int, top_logprobs: int | None = None) -> dict:  # fmt: skip
    """``generate_tokens``' state after the prefill (arguments as there)."""
    adapters = dict(projector=projector, lora=lora, lora_settings=lora_settings)
    return _prefill(model, tokens, attn_mask, row_valid, cache, pad_id, adapters, max_new_tokens, False, top_logprobs)


@functools.partial(jax.jit, static_argnames=("lora_settings", "top_logprobs"), donate_argnames=("state",))
def decode_state(model, state, stop_at, keys, eos_ids, pad_id, temperature, top_p, greedy, limits, projector=None,
                 lora=None, lora_settings=None, *, top_logprobs: int | None = None) -> dict:  # fmt: skip
    """Continue ``state`` until step ``stop_at`` (traced) or until every row is done; returns the new state."""
    adapters = dict(projector=projector, lora=lora, lora_settings=lora_settings)
    return _decode(model, state, stop_at, keys, eos_ids, pad_id, temperature, top_p, greedy, limits, adapters,
                   top_logprobs)  # fmt: skip
