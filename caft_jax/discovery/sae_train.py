"""Training BatchTopK sparse autoencoders on streamed residual-stream activations, saved as dictionary_learning SAEs.

The recipe is dictionary_learning's ``BatchTopKTrainer`` (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"),
the trainer of the SAEs the CAFT authors used for Qwen and Mistral (caft_method.md 2.3):

* encode ``post = ReLU((x - b_dec) W_enc + b_enc)`` and keep the ``k * B`` largest entries of the whole batch
  [B, d_sae] (so single tokens may use more or fewer than k latents); decode ``f W_dec + b_dec``;
* loss: squared error summed over d, averaged over tokens, plus ``auxk_alpha`` times the auxiliary loss that lets
  dead latents (no activation for ``dead_tokens`` tokens) reconstruct the residual ``x - x_hat`` with their own
  top ``d // 2`` per token, normalised by the residual's variance;
* decoder rows are unit norm: the gradient component along each row is removed before the Adam update and the rows
  are renormalised after it; W_enc starts as W_dec^T, b_dec at the geometric median of the first buffer;
* the inference threshold is an exponential moving average (``threshold_beta``) of the smallest kept activation
  per batch, from ``threshold_start`` steps on, so that a trained SAE encodes one token at a time.

Learning rate: dictionary_learning's default ``2e-4 / sqrt(d_sae / 2**14)``, linear warmup, linear decay over the
last ``decay_fraction`` of the steps. The quality report (``evaluate``) gives the explained variance, the L0 and
the dead latents of the inference-mode SAE on held-out activations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from caft_jax.discovery.sae import SAE, make_sae, write_torch_state_dict
from caft_jax.errors import ConfigError, DataError

HIGHEST = jax.lax.Precision.HIGHEST
SORT_WINDOW = 256  # texts sorted by length together before batching (see length_sorted_windows)


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """BatchTopK training settings (the defaults follow dictionary_learning, scaled to a CPU's token budget)."""

    dict_size: int = 4096
    k: int = 32
    tokens: int = 2_000_000  # training tokens per SAE
    batch_tokens: int = 2048
    lr: float = 0.0  # 0: 2e-4 / sqrt(dict_size / 2**14)
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    threshold_beta: float = 0.999
    threshold_start: int = 100  # steps before the threshold average starts
    buffer_tokens: int = 65_536  # shuffle buffer (tokens of consecutive texts are correlated)
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def learning_rate(self) -> float:
        return self.lr or 2e-4 / math.sqrt(self.dict_size / 2**14)

    def check(self, d_model: int | None = None) -> SAETrainConfig:
        for name in ("dict_size", "k", "tokens", "batch_tokens", "buffer_tokens", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SAE {name} must be at least 1; got {getattr(self, name)}.")
        if self.k >= self.dict_size:
            raise ConfigError(f"SAE k={self.k} must be smaller than dict_size={self.dict_size}.")
        if self.steps < 1:
            raise ConfigError(f"SAE tokens={self.tokens} give no step of batch_tokens={self.batch_tokens}.")
        if self.buffer_tokens < self.batch_tokens:
            raise ConfigError(f"buffer_tokens={self.buffer_tokens} must hold one batch of {self.batch_tokens}.")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.threshold_beta < 1 or self.lr < 0:
            raise ConfigError("SAE decay_fraction must be in [0, 1], threshold_beta in [0, 1) and lr >= 0.")
        if d_model is not None and self.dict_size < d_model:
            raise ConfigError(f"dict_size={self.dict_size} is below d_model={d_model}; an SAE is wider than d.")
        return self


# ---------------------------------------------------------------------------------------------------------------
# The BatchTopK step
# ---------------------------------------------------------------------------------------------------------------


def batch_topk_mask(post: jax.Array, n_keep: int) -> jax.Array:
    """bool mask of the ``n_keep`` largest entries of a non-negative array (ties at the cut are all kept).

    Non-negative float32 values order like their int32 bit patterns, so 31 halvings of the bit range find the
    n_keep-th largest value exactly: 31 compare-and-count passes over [B, d_sae] instead of a sort. At B = 2048,
    d_sae = 4096, k = 32 on this 2-core CPU (`python benchmarks/sae_topk.py`, one process, interleaved): 703 ms
    against 5,234 ms for a full sort and 5,006 ms for lax.top_k, and 577 ms for the forward's two matmuls.
    """
    bits = jax.lax.bitcast_convert_type(post.astype(jnp.float32), jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(bits >= mid) >= n_keep
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    cut, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(0x7F800000)))
    return (bits >= cut) & (post > 0)


def init_params(key: jax.Array, d: int, dict_size: int, b_dec: np.ndarray) -> dict:
    w_dec = jax.random.normal(key, (dict_size, d), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    return {"W_enc": w_dec.T, "b_enc": jnp.zeros(dict_size), "W_dec": w_dec, "b_dec": jnp.asarray(b_dec, jnp.float32)}


def geometric_median(x: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Weiszfeld's iteration for the point minimising the summed distance to the rows of x [n, d]."""
    x = np.asarray(x, np.float64)
    point = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / np.maximum(np.linalg.norm(x - point, axis=1), 1e-8)
        point = (weights[:, None] * x).sum(0) / weights.sum()
    return point.astype(np.float32)


def _losses(params, x, dead, k: int, auxk_alpha: float):
    post = jax.nn.relu(jnp.matmul(x - params["b_dec"], params["W_enc"], precision=HIGHEST) + params["b_enc"])
    keep = batch_topk_mask(post, k * x.shape[0])
    f = post * keep
    x_hat = jnp.matmul(f, params["W_dec"], precision=HIGHEST) + params["b_dec"]
    mse = jnp.mean(jnp.sum((x - x_hat) ** 2, -1))
    # dead latents reconstruct the (fixed) residual with their own per-token top d // 2
    residual = jax.lax.stop_gradient(x - x_hat)
    k_aux = min(x.shape[1] // 2, post.shape[1])

    def aux_loss():
        values, ids = jax.lax.top_k(jnp.where(dead, post, 0.0), k_aux)
        dense = jnp.zeros_like(post).at[jnp.arange(x.shape[0])[:, None], ids].set(values)
        guess = jnp.matmul(dense, params["W_dec"], precision=HIGHEST)
        scale = jnp.sum((residual - residual.mean(0)) ** 2)
        return jnp.sum((residual - guess) ** 2) / jnp.maximum(scale, 1e-12)

    aux = jax.lax.cond(jnp.any(dead), aux_loss, lambda: jnp.float32(0.0))
    stats = {"mse": mse, "aux": aux, "fired": jnp.any(f > 0, 0), "l0": jnp.sum(keep) / x.shape[0],
             "min_kept": jnp.min(jnp.where(keep, post, jnp.inf)),
             "fvu": jnp.sum((x - x_hat) ** 2) / jnp.maximum(jnp.sum((x - x.mean(0)) ** 2), 1e-12)}  # fmt: skip
    return mse + auxk_alpha * aux, stats


@functools.partial(jax.jit, static_argnames=("optimizer", "k", "auxk_alpha", "beta", "threshold_start"))
def train_step(state: dict, x: jax.Array, *, optimizer, k: int, auxk_alpha: float, beta: float, threshold_start: int):
    """One BatchTopK step; state {params, opt, since_fired [d_sae], threshold [], step []}. Returns (state, stats)."""
    params = state["params"]
    dead = state["since_fired"] > state["dead_tokens"]
    grads, stats = jax.grad(_losses, has_aux=True)(params, x, dead, k, auxk_alpha)
    w_dec = params["W_dec"]
    grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * w_dec, -1, keepdims=True) * w_dec
    updates, opt = optimizer.update(grads, state["opt"], params)
    params = optax.apply_updates(params, updates)
    params["W_dec"] = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=-1, keepdims=True)
    step = state["step"] + 1
    averaged = jnp.where(
        state["threshold"] < 0, stats["min_kept"], beta * state["threshold"] + (1 - beta) * stats["min_kept"]
    )
    threshold = jnp.where(step > threshold_start, averaged, state["threshold"])
    since = jnp.where(stats["fired"], 0, state["since_fired"] + x.shape[0])
    new = dict(state, params=params, opt=opt, since_fired=since, threshold=threshold, step=step)
    return new, {key: v for key, v in stats.items() if key != "fired"} | {"dead": jnp.sum(dead)}


def optimizer_for(cfg: SAETrainConfig) -> optax.GradientTransformation:
    lr, steps = cfg.learning_rate, cfg.steps
    warmup = min(cfg.warmup_steps, steps)
    decay = min(int(cfg.decay_fraction * steps), steps - warmup)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0 if warmup else lr, lr, max(warmup, 1)),
            optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, max(decay, 1)),
        ],
        [warmup, steps - decay],
    )
    return optax.adam(schedule)


# ---------------------------------------------------------------------------------------------------------------
# Streaming activations
# ---------------------------------------------------------------------------------------------------------------


def corpus_activations(
    model, tokenizer, texts: Iterable[str], layers, *, site: str = "resid_post", batch_size: int = 8,
    max_len: int = 256,
) -> Iterator[dict[int, np.ndarray]]:  # fmt: skip
    """{layer: float32 [n, d]} per batch of texts: every real token except each text's first (the attention sink,
    whose norm is ~100x the rest on SmolLM2 and would dominate the reconstruction loss)."""
    from caft_jax.data import pad_token_id
    from caft_jax.discovery.capture import iter_activations
    from caft_jax.discovery.corpus import text_batches

    def batches():
        for _, n_rows, tokens, attn_mask in text_batches(
            tokenizer, length_sorted_windows(texts), batch_size, max_len, pad_token_id(tokenizer)
        ):
            yield {"tokens": tokens, "attn_mask": attn_mask, "row_valid": np.arange(len(tokens)) < n_rows}

    yield from iter_activations(model, batches(), layers, site=site, mask="nonpad", exclude_first=True)


def length_sorted_windows(texts: Iterable[str], window: int = SORT_WINDOW) -> Iterator[str]:
    """The texts with each run of ``window`` consecutive ones sorted by length: a batch then pads to similar
    lengths (on a corpus of short prompts and a few long chats, unsorted batches are ~3x padding), while the
    order beyond a window, which the shuffle buffer cannot mix, stays as given."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == window:
            yield from sorted(chunk, key=_text_length)
            chunk = []
    yield from sorted(chunk, key=_text_length)


def _text_length(text) -> int:
    return len(text) if isinstance(text, str) else 0  # a non-string is refused by text_batches


def replayed(make_pass, cache_bytes: int) -> Iterator[dict[int, np.ndarray]]:
    """The chunks of ``make_pass()`` (one pass over a corpus), then the same pass again and again: replayed from
    memory when it fits in ``cache_bytes`` (a small corpus is captured once), else captured anew each time."""
    cached: list[dict[int, np.ndarray]] | None = []
    size, seen = 0, False
    for chunk in make_pass():
        seen = True
        if cached is not None:
            size += sum(a.nbytes for a in chunk.values())
            if size <= cache_bytes:
                cached.append(chunk)
            else:
                cached = None
        yield chunk
    if not seen:
        return
    while True:
        yield from cached if cached is not None else make_pass()


def shuffled_batches(
    chunks: Iterable[Mapping[int, np.ndarray]], layers, batch_tokens: int, buffer_tokens: int, seed: int = 0
) -> Iterator[dict[int, np.ndarray]]:
    """Minibatches {layer: [batch_tokens, d]} drawn from a shuffle buffer of streamed chunks {layer: [n, d]}.

    The same permutation applies to every layer, so one token's activations stay aligned across layers.
    """
    rng = np.random.default_rng(seed)
    pending: list[Mapping[int, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk[layers[0]])
        if held >= buffer_tokens:
            pending, held = yield from _drain(pending, layers, batch_tokens, rng, keep_half=True)
    if held >= batch_tokens:
        yield from _drain(pending, layers, batch_tokens, rng, keep_half=False)


def _drain(pending, layers, batch_tokens: int, rng, *, keep_half: bool):
    """Yield shuffled minibatches from the pending chunks; with ``keep_half``, about half the tokens stay to mix
    with the next texts. Returns (the rest as one chunk list, its token count)."""
    buffer = {layer: np.concatenate([c[layer] for c in pending]) for layer in layers}
    held = len(buffer[layers[0]])
    order = rng.permutation(held)
    n_out = (held // batch_tokens) * batch_tokens
    if keep_half:
        n_out = (held // 2 // batch_tokens) * batch_tokens or n_out
    for start in range(0, n_out, batch_tokens):
        yield {layer: buffer[layer][order[start : start + batch_tokens]] for layer in layers}
    rest = order[n_out:]
    return [{layer: buffer[layer][rest] for layer in layers}], len(rest)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


def train_saes(
    batches: Iterable[Mapping[int, np.ndarray]],
    layers,
    cfg: SAETrainConfig,
    *,
    progress: bool = True,
    log_every: int = 50,
) -> tuple[dict[int, SAE], dict[int, list[dict]]]:
    """BatchTopK SAEs, one per layer, from minibatches {layer: [batch_tokens, d]} (e.g. ``shuffled_batches``).

    Stops after ``cfg.steps`` steps or when the batches run out. Returns ({layer: SAE}, {layer: curve}), a curve
    being [{"step", "mse", "fvu", "aux", "l0", "dead", "lr"}] every ``log_every`` steps.
    """
    layers = [int(layer) for layer in layers]
    optimizer = optimizer_for(cfg)
    step_kwargs = dict(optimizer=optimizer, k=cfg.k, auxk_alpha=cfg.auxk_alpha, beta=cfg.threshold_beta,
                       threshold_start=cfg.threshold_start)  # fmt: skip
    states: dict[int, dict] = {}
    curves: dict[int, list[dict]] = {layer: [] for layer in layers}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="sae", unit="step", dynamic_ncols=True)
    step = 0
    for batch in batches:
        if step >= cfg.steps:
            break
        for i, layer in enumerate(layers):
            x = jnp.asarray(batch[layer], jnp.float32)
            if layer not in states:
                key = jax.random.fold_in(jax.random.key(cfg.seed), layer)
                params = init_params(key, x.shape[1], cfg.dict_size, geometric_median(batch[layer]))
                states[layer] = {"params": params, "opt": optimizer.init(params), "step": jnp.int32(0),
                                 "since_fired": jnp.zeros(cfg.dict_size, jnp.int32), "threshold": jnp.float32(-1.0),
                                 "dead_tokens": jnp.int32(cfg.dead_tokens)}  # fmt: skip
            states[layer], stats = train_step(states[layer], x, **step_kwargs)
            if step % log_every == 0 or step == cfg.steps - 1:
                row = {key: float(v) for key, v in jax.device_get(stats).items()}
                curves[layer].append({"step": step, **row})
                if bar is not None and i == 0:
                    bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.0f}", dead=int(row["dead"]))
        step += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not states:
        raise DataError("the corpus gave no batch of activations; use a larger corpus or a smaller batch_tokens.")
    saes = {}
    for layer, state in states.items():
        p = jax.device_get(state["params"])
        threshold = float(state["threshold"])
        saes[layer] = make_sae(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], np.float32(max(threshold, 0.0)),
                               kind="batchtopk", k=cfg.k, source=f"layer {layer}")  # fmt: skip
    return saes, curves


@jax.jit
def _eval_sums(sae: SAE, x: jax.Array):
    f = sae.encode(x)
    err = x - sae.decode(f)
    return jnp.sum(err**2), jnp.sum(x, 0), jnp.sum(x**2), jnp.sum(f > 0), jnp.any(f > 0, 0)


def evaluate(sae: SAE, acts: np.ndarray, batch: int = 4096) -> dict:
    """Inference-mode quality on held-out activations [n, d]: explained variance, MSE, L0, dead latents."""
    acts = np.asarray(acts, np.float32)
    if acts.ndim != 2 or acts.shape[1] != sae.d_model or len(acts) == 0:
        raise DataError(f"evaluation activations must be [n > 0, {sae.d_model}]; got {acts.shape}.")
    sq_err = total = sq = active = 0.0
    fired = np.zeros(sae.d_sae, bool)
    for start in range(0, len(acts), batch):
        e, s, q, a, f = jax.device_get(_eval_sums(sae, jnp.asarray(acts[start : start + batch])))
        sq_err, total, sq, active = sq_err + float(e), total + s, sq + float(q), active + float(a)
        fired |= f
    n = len(acts)
    variance = sq - float(np.sum(total.astype(np.float64) ** 2)) / n
    return {"n_tokens": n, "explained_variance": 1.0 - sq_err / variance, "mse": sq_err / n, "l0": active / n,
            "dead_latents": int((~fired).sum()), "dead_fraction": float((~fired).mean())}  # fmt: skip


def save_dictionary_learning(sae: SAE, directory: str | os.PathLike, trainer: Mapping) -> pathlib.Path:
    """Write ``ae.pt`` (dictionary_learning's BatchTopKSAE state dict) and ``config.json`` into ``directory``."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    arrays = jax.device_get(sae)
    state = {  # BatchTopKSAE.state_dict()'s order: own parameter, own buffers, then the submodules
        "b_dec": np.asarray(arrays.b_dec),
        "k": np.int32(sae.k),
        "threshold": np.asarray(arrays.threshold, np.float32).reshape(()),
        "encoder.weight": np.asarray(arrays.W_enc).T,
        "encoder.bias": np.asarray(arrays.b_enc),
        "decoder.weight": np.asarray(arrays.W_dec).T,
    }
    write_torch_state_dict(out / "ae.pt", state)
    config = {"trainer": {"trainer_class": "BatchTopKTrainer", "dict_class": "BatchTopKSAE",
                          "activation_dim": sae.d_model, "dict_size": sae.d_sae, "k": sae.k, **trainer}}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def plot_curves(curves: Mapping[int, list[dict]], path: str | os.PathLike) -> None:
    """Fraction of variance unexplained and dead latents against the step, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fvu, ax_dead) = plt.subplots(1, 2, figsize=(10, 3.6))
    for layer, curve in sorted(curves.items()):
        steps = [row["step"] for row in curve]
        ax_fvu.plot(steps, [row["fvu"] for row in curve], label=f"layer {layer}")
        ax_dead.plot(steps, [row["dead"] for row in curve], label=f"layer {layer}")
    ax_fvu.set(xlabel="step", ylabel="fraction of variance unexplained (train batch)", yscale="log")
    ax_dead.set(xlabel="step", ylabel="dead latents")
    ax_fvu.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
