"""Batched text generation from prompts: encoding, length-bucketed batches, and the results per prompt.

``generate`` (text prompts) and ``generate_rows`` (token ids, each row with its own sampling settings) batch the
prompts longest first, left-pad them to a power-of-two bucket and run the jitted programs of ``caft_jax.decode``
(prefill + decode in one program, or in chunks of steps when the caller streams the tokens). Prompt lengths, batch
widths and token budgets come from a few bucket sizes, so a whole evaluation compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.batching import PROMPT_BUCKETS, Bucketer, left_pad
from caft_jax.chat import render_prompt
from caft_jax.decode import decode_state, generate_tokens, prefill_state
from caft_jax.errors import CaftError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import KVCache, Model
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


def _row_results(out: dict, r: int, record_logits: bool, top_logprobs: int | None) -> dict:
    """Row r of a finished batch (host arrays) as generate_rows returns it."""
    n = int(out["lengths"][r])
    result = {"token_ids": [int(x) for x in out["tokens"][r, :n]],
              "finish_reason": "stop" if out["stopped"][r] else "length"}  # fmt: skip
    if record_logits:
        result["logits"] = out["logits"][r, :n]
    if top_logprobs is not None:
        result["logprobs"] = out["logprob"][r, :n]
        result["top_ids"] = out["top_ids"][r, :n]
        result["top_logprobs"] = out["top_logprobs"][r, :n]
    return result


def _stream_batch(inputs: dict, rows: dict, n_live: int, on_tokens, every: int, max_new: int, top_logprobs):
    """Prefill, then decode ``every`` steps at a time, calling ``on_tokens(r, piece)`` with each row's new tokens
    ({"token_ids"[, "logprobs", "top_ids", "top_logprobs"]}) after every chunk. Returns the final device state."""
    state = prefill_state(**inputs, max_new_tokens=max_new, top_logprobs=top_logprobs)
    sent = np.zeros(n_live, int)
    names = ["out", "lengths", "done"] + (["logprob", "top_ids", "top_logprobs"] if top_logprobs is not None else [])
    model, adapters = inputs["model"], {k: inputs[k] for k in ("projector", "lora", "lora_settings")}
    stop_at = 0
    while True:
        stop_at += every
        state = decode_state(model, state, jnp.int32(stop_at), pad_id=inputs["pad_id"], **rows, **adapters,
                             top_logprobs=top_logprobs)  # fmt: skip
        host = jax.device_get({k: state[k] for k in names})
        for r in range(n_live):
            n = int(host["lengths"][r])
            if n > sent[r]:
                piece = {"token_ids": [int(x) for x in host["out"][r, sent[r] : n]]}
                for key, name in (("logprobs", "logprob"), ("top_ids", "top_ids"), ("top_logprobs", "top_logprobs")):
                    if name in host:
                        piece[key] = host[name][r, sent[r] : n]
                on_tokens(r, piece)
                sent[r] = n
        if host["done"][:n_live].all() or stop_at >= max_new:
            return state


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
    on_tokens: Callable[[int, dict], None] | None = None,
    stream_every: int = 8,
) -> list[dict]:
    """Generate from token-id rows, each with its own sampling settings.

    Rows are batched longest first (results keep input order). A batch decodes for its rows' largest
    max_new_tokens, rounded up by ``new_token_buckets`` when given (a server mixing request sizes then compiles a
    few programs), and each row stops at its own budget. Returns per row {"token_ids", "finish_reason"} plus
    "logits" [n, V] with ``record_logits`` and "logprobs" [n], "top_ids" [n, k], "top_logprobs" [n, k] with
    ``top_logprobs`` k. ``row_buckets`` rounds the batch width up (inactive rows fill it), so a server's batches of
    3, 5 or 6 requests share one program. With ``on_tokens(row index, piece)`` the batch decodes ``stream_every``
    steps per program call and reports each row's new tokens after every call (same tokens as without).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise GenerationError(f"batch_size must be at least 1, got {batch_size}.")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise GenerationError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}.")
    if on_tokens is not None and record_logits:
        raise GenerationError("record_logits is not available while streaming tokens.")
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
        inputs = dict(model=model, tokens=jnp.asarray(tokens), attn_mask=jnp.asarray(mask),
                      row_valid=jnp.asarray(np.arange(width) < len(idx)), cache=cache, pad_id=jnp.int32(pad_id),
                      projector=projector, lora=lora, lora_settings=lora_settings)  # fmt: skip
        per_row = {"eos_ids": eos, **_row_arrays(batch, width)}
        if on_tokens is None:
            out = generate_tokens(**inputs, **per_row, max_new_tokens=max_new, record_logits=record_logits,
                                  top_logprobs=top_logprobs)  # fmt: skip
        else:
            final = _stream_batch(inputs, per_row, len(idx), lambda r, piece, idx=idx: on_tokens(idx[r], piece),
                                  stream_every, max_new, top_logprobs)  # fmt: skip
            out = {"tokens": final["out"], **{k: final[k] for k in final if k != "out"}}
        cache = out.pop("cache")
        out = jax.device_get(out)
        for r, i in enumerate(idx):
            results[i] = _row_results(out, r, record_logits, top_logprobs)
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
