"""Batched text generation with a preallocated KV cache: prefill and decode in one jitted program.

One call of the jitted ``generate_tokens`` handles one batch:

1. prefill: the left-padded prompt batch, minus its last column, is written into a ``KVCache`` of length
   ``prompt bucket + max_new_tokens`` (no logits are computed: the LM head over a whole prompt is the largest
   tensor of the pass and only the last position is needed);
2. decode: a ``jax.lax.while_loop`` feeds one token per row per step (step 0 feeds the prompt's last token), picks
   the next token (greedy, temperature or nucleus sampling) and stops when every row has emitted an EOS token or
   ``max_new_tokens`` tokens.

Left padding puts every row's last prompt token in the same column, so one slice update serves the batch; each
row's rotary positions continue from its own real-token count. The projector (test-time ablation), LoRA weights,
sampling temperature and top-p are traced arguments, so none of them recompiles; prompt lengths are rounded up to
powers of two and the batch size is fixed per call, so a whole evaluation compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.batching import PROMPT_BUCKETS, Bucketer, left_pad
from caft_jax.chat import render_prompt
from caft_jax.errors import CaftError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import KVCache, Model, default_positions, forward
from caft_jax.projector import Projector

# OpenAI's limit on top_logprobs; the server records this many whenever a batch asks for any
MAX_TOP_LOGPROBS = 20


class GenerationError(CaftError):
    """Generation inputs or settings are invalid."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens.

    Attributes:
      max_new_tokens: generate at most this many tokens per prompt (the paper's EM evaluation: 600).
      temperature: logits are divided by it before sampling; 0 means greedy.
      top_p: nucleus sampling; keep the smallest set of most likely tokens whose mass reaches top_p (1 = all).
      greedy: take the argmax (temperature and top_p are then ignored).
      seed: base of the per-prompt PRNG keys; a prompt's key depends on (seed, its index in the prompt list)
        only, so its sample does not change with the batch size or the other prompts.
    """

    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def mode(self) -> str:
        """How tokens are picked: "greedy", "sample" (from all tokens) or "top_p" (needs a sort per step)."""
        if self.greedy or self.temperature == 0:
            return "greedy"
        return "top_p" if self.top_p < 1.0 else "sample"


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
    b = tokens.shape[0]
    adapters = dict(projector=projector, lora=lora, lora_settings=lora_settings)
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

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

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
        if record_logits:
            new["logits"] = jax.lax.dynamic_update_slice(s["logits"], logits[:, None], (0, step, 0))
        if top_logprobs is not None:
            for name, value in token_logprobs(logits, chosen, top_logprobs).items():
                at = (0, step) + (0,) * (value.ndim - 1)
                new[name] = jax.lax.dynamic_update_slice(s[name], value[:, None], at)
        return new

    final = jax.lax.while_loop(cond, body, state)
    result = {k: final[k] for k in ("lengths", "stopped", "cache")}
    result["tokens"] = final["out"]
    for name in ("logits", "logprob", "top_ids", "top_logprobs"):
        if name in final:
            result[name] = final[name]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Host side: prompts -> batches -> results
# ---------------------------------------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: Sequence, *, chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenised (with the chat template + generation prompt when ``chat``);
    lists of ints are used as they are."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise GenerationError("text prompts need a tokenizer; pass one or give token-id lists.")
            if chat:
                text = render_prompt(tokenizer, prompt, system)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
            else:
                ids = tokenizer(prompt)["input_ids"]
        else:
            ids = [int(x) for x in prompt]
        if not ids:
            raise GenerationError(f"prompt {i} has no tokens; drop empty prompts.")
        out.append(list(ids))
    return out


def stop_token_ids(model: Model, tokenizer) -> list[int]:
    """EOS ids: the model config's eos_token_id(s) plus the tokenizer's eos token."""
    ids = list(model.spec.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def pad_id_for(model: Model, tokenizer) -> int:
    if tokenizer is not None:
        from caft_jax.data import pad_token_id

        return pad_token_id(tokenizer)
    spec = model.spec
    return int(spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_ids or (0,))[0])


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch, longest first, so each batch pads to a similar length (results keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _new_cache(model: Model, rows: int, max_len: int) -> KVCache:
    """A zero KVCache placed like the cache ``generate_tokens`` returns.

    jit keys its compiled programs on argument placement too: an uncommitted fresh cache and the committed cache
    that comes back from a call would compile the same program twice. On one device we commit the fresh cache to
    the model's device; a model sharded over several devices may compile once more on the first reuse.
    """
    cache = KVCache.zeros(model.spec, rows, max_len, model.dtype)
    devices = model.params["table"].devices()
    if len(devices) == 1:
        cache = jax.device_put(cache, jax.sharding.SingleDeviceSharding(next(iter(devices))))
    return cache


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to continue: its prompt ids, its sampling settings, and its PRNG stream (the row's key is
    ``fold_in(key(sampling.seed), stream)``, so its sample depends on neither its batch nor its neighbours)."""

    ids: Sequence[int]
    sampling: SamplingConfig
    stream: int = 0


def _row_arrays(rows: Sequence[Row], width: int) -> dict[str, jax.Array]:
    """Per-row sampling inputs of ``generate_tokens`` for ``rows``, padded with inactive greedy rows to ``width``."""
    filler = Row((0,), SamplingConfig(max_new_tokens=1, greedy=True))
    rows = list(rows) + [filler] * (width - len(rows))
    seeds = jnp.asarray([r.sampling.seed for r in rows], jnp.uint32)
    streams = jnp.asarray([r.stream for r in rows], jnp.uint32)
    return {
        "keys": jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(seeds, streams),
        "temperature": jnp.asarray([r.sampling.temperature or 1.0 for r in rows], jnp.float32),  # unused if greedy
        "top_p": jnp.asarray([r.sampling.top_p for r in rows], jnp.float32),
        "greedy": jnp.asarray([r.sampling.mode == "greedy" for r in rows]),
        "limits": jnp.asarray([r.sampling.max_new_tokens for r in rows], jnp.int32),
    }


def generate_rows(
    model: Model,
    rows: Sequence[Row],
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 8,
    progress: bool = True,
    record_logits: bool = False,
    top_logprobs: int | None = None,
    new_token_buckets: Bucketer | None = None,
    row_buckets: Bucketer | None = None,
) -> list[dict]:
    """Generate from token-id rows, each with its own sampling settings.

    Rows are batched longest first (results keep input order). A batch decodes for its rows' largest
    max_new_tokens, rounded up by ``new_token_buckets`` when given (a server mixing request sizes then compiles a
    few programs), and each row stops at its own budget. Returns per row {"token_ids", "finish_reason"} plus
    "logits" [n, V] with ``record_logits`` and "logprobs" [n], "top_ids" [n, k], "top_logprobs" [n, k] with
    ``top_logprobs`` k. ``row_buckets`` rounds the batch width up (inactive rows fill it), so a server's batches of
    3, 5 or 6 requests share one program.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise GenerationError(f"batch_size must be at least 1, got {batch_size}.")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}.")
    width = min(batch_size, len(rows))
    if row_buckets is not None:
        width = row_buckets.length_for(width)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    results: list[dict | None] = [None] * len(rows)
    cache = None
    batches = _batches([len(r.ids) for r in rows], width)
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        batch = [rows[i] for i in idx]
        length = PROMPT_BUCKETS.length_for(max(len(r.ids) for r in batch))
        max_new = max(r.sampling.max_new_tokens for r in batch)
        if new_token_buckets is not None:
            max_new = new_token_buckets.length_for(max_new)
        tokens, mask = left_pad([r.ids for r in batch], width, length, pad_id)
        if cache is None or cache.k.shape[2] != length + max_new:
            cache = _new_cache(model, width, length + max_new)
        out = generate_tokens(
            model,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(np.arange(width) < len(idx)),
            cache=cache,
            eos_ids=eos,
            pad_id=jnp.int32(pad_id),
            projector=projector,
            lora=lora,
            lora_settings=lora_settings,
            max_new_tokens=max_new,
            record_logits=record_logits,
            top_logprobs=top_logprobs,
            **_row_arrays(batch, width),
        )
        cache = out.pop("cache")
        out = jax.device_get(out)
        for r, i in enumerate(idx):
            n = int(out["lengths"][r])
            results[i] = {
                "token_ids": [int(x) for x in out["tokens"][r, :n]],
                "finish_reason": "stop" if out["stopped"][r] else "length",
            }
            if record_logits:
                results[i]["logits"] = out["logits"][r, :n]
            if top_logprobs is not None:
                results[i]["logprobs"] = out["logprob"][r, :n]
                results[i]["top_ids"] = out["top_ids"][r, :n]
                results[i]["top_logprobs"] = out["top_logprobs"][r, :n]
    return results


def generate_ids(
    model: Model,
    prompt_ids: list[list[int]],
    cfg: SamplingConfig,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 8,
    progress: bool = True,
    record_logits: bool = False,
) -> list[dict]:
    """``generate_rows`` with one sampling config for every prompt; prompt i samples from stream i."""
    return generate_rows(
        model,
        [Row(ids, cfg, i) for i, ids in enumerate(prompt_ids)],
        eos_ids=eos_ids,
        pad_id=pad_id,
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        batch_size=batch_size,
        progress=progress,
        record_logits=record_logits,
    )


def generate(
    model: Model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    cfg: SamplingConfig = SamplingConfig(),
    *,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 8,
    chat: bool = False,
    system: str | None = None,
    progress: bool = True,
    eos_token_ids: Sequence[int] | None = None,
) -> list[dict]:
    """Generate a continuation of every prompt.

    Args:
      model, tokenizer: from ``load_model`` / ``load_tokenizer`` (tokenizer may be None for token-id prompts;
        ``text`` is then None).
      prompts: strings, or token-id lists used verbatim.
      cfg: sampling settings.
      lora, lora_settings: a LoRA adapter (e.g. from ``export.load_peft_adapter``).
      projector: ablate these directions at test time, in prefill and decode.
      batch_size: rows per jitted call; a final partial batch is filled with inactive rows.
      chat: render each string with the chat template and its generation prompt; ``system`` adds a system message.
      progress: tqdm bar over batches.
      eos_token_ids: stop tokens (default: the config's eos ids plus the tokenizer's eos).
    Returns:
      One dict per prompt, in order: {"prompt": the input, "text": decoded continuation without the EOS and
      special tokens, "token_ids": generated ids (EOS included when it stopped), "finish_reason": "stop" | "length"}.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    prompt_ids = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    eos = list(eos_token_ids) if eos_token_ids is not None else stop_token_ids(model, tokenizer)
    raw = generate_ids(
        model,
        prompt_ids,
        cfg,
        eos_ids=eos,
        pad_id=pad_id_for(model, tokenizer),
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        batch_size=batch_size,
        progress=progress,
    )
    results = []
    for prompt, r in zip(prompts, raw, strict=True):
        ids = r["token_ids"][:-1] if r["finish_reason"] == "stop" else r["token_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
        results.append({"prompt": prompt, "text": text, **r})
    return results
