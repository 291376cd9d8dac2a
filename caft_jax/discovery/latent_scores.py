"""Scores and rankings of SAE latents for direction discovery (caft_method.md sections 2.3 and 2.4).

* ``sae_attribution``: gradient-times-latent attribution of every latent to a metric ("ce" on answer tokens, or
  "logit_diff" between two answer letters of ``letter_batches``), through the model's ``forward``.
* ``mean_latent_diff`` / ``sae_on_diff``: latent sums over fine-tuned minus base activations.
* ``rank_latents``: top-k latents by any of these scores, per layer or across layers; ``save_ranking`` and
  ``load_ranking`` keep a ranking in the files `discover sae` writes and `discover select --sae` reads.

The SAEs themselves (``SAE``, the loaders) are in ``sae``.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.discovery.capture import SITES, first_token_mask
from caft_jax.discovery.sae import HIGHEST, SAE
from caft_jax.errors import ConfigError, DataError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Capture, Model, forward
from caft_jax.projector import Projector

METRICS = ("ce", "logit_diff")


# ---------------------------------------------------------------------------------------------------------------
# Attribution
# ---------------------------------------------------------------------------------------------------------------


def _metric_value(logits, batch, metric: str) -> jax.Array:
    """Scalar metric of one batch from logits [b, t, V] (see ``sae_attribution``)."""
    valid = batch["row_valid"]
    if metric == "ce":
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        targets = batch["tokens"][:, 1:]
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"][:, 1:] & valid[:, None]
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    last = logits[:, -1].astype(jnp.float32)
    diff = jnp.take_along_axis(last, batch["target"][:, None], -1) - jnp.take_along_axis(
        last, batch["other"][:, None], -1
    )
    return jnp.sum(jnp.where(valid, diff[:, 0], 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@functools.partial(jax.jit, static_argnames=("lora_settings", "capture", "metric"))
def _attribution_step(model, saes, batch, keep, lora, lora_settings, projector, capture, metric):
    """(metric, per-layer gradient-times-latent effects [d_sae] summed over kept positions) of one batch."""
    b, t = batch["tokens"].shape

    def run(delta):
        out = forward(
            model,
            batch["tokens"],
            attn_mask=batch["attn_mask"],
            lora=lora,
            lora_settings=lora_settings,
            projector=projector,
            capture=capture,
            capture_delta=delta,
        )
        return _metric_value(out.logits, batch, metric), out.captured

    delta0 = jnp.zeros((len(capture.layers), b, t, model.spec.d_model), jnp.float32)
    (value, acts), grads = jax.value_and_grad(run, has_aux=True)(delta0)
    effects = []
    for i, sae in enumerate(saes):
        feats = sae.encode(acts[i]) * keep[..., None]  # [b, t, d_sae]
        along = jnp.matmul(grads[i].astype(jnp.float32), sae.W_dec.T, precision=HIGHEST)  # W_dec[j] . g, [b, t, d_sae]
        effects.append(jnp.einsum("bts,bts->s", feats, along, precision=HIGHEST))
    return value, effects


def attribution_batch(batch: dict, metric: str) -> dict:
    """The device arrays ``sae_attribution`` needs from a batch dict, with clear errors for missing fields."""
    if metric not in METRICS:
        raise ConfigError(f"attribution metric {metric!r} is unknown; use one of {', '.join(METRICS)}.")
    need = ["tokens", "attn_mask"] + (["loss_mask"] if metric == "ce" else ["target", "other"])
    missing = [k for k in need if k not in batch]
    if missing:
        raise DataError(
            f"metric {metric!r} needs batches with {', '.join(missing)}; build them with caft_jax.data"
            + (" and letter_batches." if metric == "logit_diff" else ".")
        )
    b, t = np.shape(batch["tokens"])
    out = {
        "tokens": jnp.asarray(batch["tokens"], jnp.int32),
        "attn_mask": jnp.asarray(batch["attn_mask"], bool),
        "row_valid": jnp.asarray(batch.get("row_valid", np.ones(b, bool)), bool),
        "loss_mask": jnp.asarray(batch.get("loss_mask", np.zeros((b, t), bool)), bool),
        "target": jnp.asarray(batch.get("target", np.zeros(b, np.int32)), jnp.int32),
        "other": jnp.asarray(batch.get("other", np.zeros(b, np.int32)), jnp.int32),
    }
    return out


def attribution_positions(batch: dict, *, exclude_bos: bool = True) -> np.ndarray:
    """Positions summed in the attribution: real tokens of valid rows, minus each row's first token. bool [b, t]."""
    keep = np.asarray(batch["attn_mask"], bool).copy()
    if "row_valid" in batch:
        keep &= np.asarray(batch["row_valid"], bool)[:, None]
    if exclude_bos:
        keep &= ~first_token_mask(batch["attn_mask"])
    return keep


def sae_attribution(
    model: Model,
    sae_by_layer: dict[int, SAE],
    batches: Iterable[dict],
    *,
    metric: str = "ce",
    site: str = "resid_post",
    exclude_bos: bool = True,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Attribution of every SAE latent to a metric (caft_method.md 2.3 item 1 and 2.4).

    For each batch, with x the activation at ``site`` of layer l, g = d metric / d x (the total derivative through
    the rest of the network, as a backward hook on that layer's output gives) and f = SAE_l.encode(x)::

        effect_i = sum over rows and positions p (real tokens, not the first token of a row when exclude_bos)
                   of f_i(x_p) * (W_dec[i] . g_p)

    and the result is the mean of the per-batch effects over batches (the authors' "summed over batches /
    n_batches"; with batch size 1 this is the mean over examples). Positive values are latents whose first-order
    contribution raises the metric.

    Args:
      model: the model whose activations are attributed (the base model in the paper).
      sae_by_layer: {layer: SAE} with d_model matching the model.
      batches: batch dicts. metric "ce" uses ``loss_mask``; "logit_diff" needs ``target`` and ``other`` int [b]
        token ids (see ``letter_batches``) and uses each row's last position (rows are left-padded).
      metric: "ce" = mean next-token cross-entropy over answer tokens (loss_mask) of the batch's valid rows;
        "logit_diff" = mean over valid rows of logit(target) - logit(other) at the last position.
      site: "resid_post" or "resid_mid".
      exclude_bos: leave each row's first real token out of the sum.
      lora, lora_settings, projector: optional adapter / ablation in the forward (dropout off).
      progress: show a progress bar.
    Returns:
      {layer: float64 [d_sae]}.
    """
    if site not in SITES:
        raise ConfigError(f"attribution site {site!r} is unknown; use one of {', '.join(SITES)}.")
    if not sae_by_layer:
        raise ConfigError("sae_by_layer is empty; pass at least one {layer: SAE}.")
    layers = tuple(sorted(int(layer) for layer in sae_by_layer))
    bad = [layer for layer in layers if not 0 <= layer < model.spec.n_layers]
    if bad:
        raise ConfigError(f"SAE layers {bad} are outside the model's {model.spec.n_layers} layers.")
    saes = tuple(sae_by_layer[layer] for layer in layers)
    for layer, sae in zip(layers, saes, strict=True):
        if sae.d_model != model.spec.d_model:
            raise ConfigError(
                f"the layer {layer} SAE reads d={sae.d_model} activations but the model has d_model="
                f"{model.spec.d_model}; use SAEs trained on this model."
            )
    if lora is not None and lora_settings is None:
        raise ConfigError("LoRA weights were given without lora_settings; pass LoraConfig.settings().")
    settings = None if lora_settings is None else LoraSettings(scale=lora_settings.scale, dropout=0.0)
    capture = Capture(layers, site, jnp.float32)
    totals = [np.zeros(sae.d_sae, np.float64) for sae in saes]
    n_batches = 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"attribution ({metric})", unit="batch", dynamic_ncols=True)
    for batch in batches:
        device_batch = attribution_batch(batch, metric)
        keep = jnp.asarray(attribution_positions(batch, exclude_bos=exclude_bos), jnp.float32)
        _, effects = _attribution_step(model, saes, device_batch, keep, lora, settings, projector, capture, metric)
        for total, effect in zip(totals, effects, strict=True):
            total += np.asarray(effect, np.float64)
        n_batches += 1
    if n_batches == 0:
        raise DataError("sae_attribution got no batches; pass a non-empty dataset.")
    return {layer: total / n_batches for layer, total in zip(layers, totals, strict=True)}


def letter_batches(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    others: Sequence[str],
    *,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
) -> list[dict[str, np.ndarray]]:
    """Prompt-only batches for the "logit_diff" metric (the spurious-task setting of caft_method.md 2.4).

    Each prompt is tokenised with the tokenizer's default special tokens (BOS for Gemma) and left-padded; batch dicts
    get ``target`` and ``other`` int32 [b]: the token ids of the intended and the other answer letter (" A" style,
    see ``caft_jax.data.letter_token_id``). Rows filling a final partial batch have row_valid False. File order.
    """
    from caft_jax.data import letter_token_id, make_batches

    if not (len(prompts) == len(targets) == len(others)) or not prompts:
        raise DataError(
            f"letter_batches got {len(prompts)} prompts, {len(targets)} targets and {len(others)} others; "
            "pass one target and one other letter per prompt."
        )
    examples = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        examples.append((ids, [False] * len(ids)))
    target_ids = np.array([letter_token_id(tokenizer, t) for t in targets], np.int32)
    other_ids = np.array([letter_token_id(tokenizer, o) for o in others], np.int32)
    out = []
    batches = make_batches(examples, batch_size, seed=0, epoch=0, pad_id=pad_id, buckets=buckets, shuffle=False)
    for i, batch in enumerate(batches):
        lo, hi = i * batch_size, min((i + 1) * batch_size, len(examples))
        batch["target"] = np.zeros(batch_size, np.int32)
        batch["other"] = np.zeros(batch_size, np.int32)
        batch["target"][: hi - lo] = target_ids[lo:hi]
        batch["other"][: hi - lo] = other_ids[lo:hi]
        out.append(batch)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Activation-difference rankings
# ---------------------------------------------------------------------------------------------------------------

ENCODE_CHUNK = 1024


@jax.jit
def _code_sum(sae: SAE, x: jax.Array, valid: jax.Array) -> jax.Array:
    """sum over valid rows of SAE.encode(x): x [c, d], valid [c] -> [d_sae]."""
    return jnp.sum(sae.encode(x) * valid[:, None], axis=0)


def latent_sums(sae: SAE, X, *, chunk: int = ENCODE_CHUNK) -> np.ndarray:
    """sum over rows of SAE.encode(X) for X [n, d], in fixed-size chunks (one compilation). float64 [d_sae]."""
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[1] != sae.d_model:
        raise DataError(f"expected activations [n, {sae.d_model}] for this SAE, got shape {X.shape}.")
    total = np.zeros(sae.d_sae, np.float64)
    rows = min(chunk, max(len(X), 1))
    for start in range(0, len(X), rows):
        part = X[start : start + rows]
        valid = np.zeros(rows, np.float32)
        valid[: len(part)] = 1.0
        padded = np.zeros((rows, X.shape[1]), np.float32)
        padded[: len(part)] = part
        total += np.asarray(_code_sum(sae, padded, valid), np.float64)
    return total


def _chunks(data) -> Iterable[dict]:
    return [data] if isinstance(data, dict) else data


def mean_latent_diff(sae_by_layer: dict[int, SAE], pairs) -> dict[int, np.ndarray]:
    """sum_tokens SAE.encode(act_ft) - sum_tokens SAE.encode(act_base) per layer (caft_method.md 2.3 item 2).

    Args:
      sae_by_layer: {layer: SAE}.
      pairs: {layer: (act_base [n, d], act_ft [n, d])}, or an iterable of such dicts (e.g. ``iter_pairs``
        output, to stream over batches). Layers without an SAE are ignored.
    Returns:
      {layer: float64 [d_sae]}; rank with ``rank_latents(..., positive_only=True)`` as the authors do.
    """
    out = {int(layer): np.zeros(sae.d_sae, np.float64) for layer, sae in sae_by_layer.items()}
    for chunk in _chunks(pairs):
        for layer, (base, tuned) in chunk.items():
            if int(layer) in out:
                sae = sae_by_layer[layer]
                out[int(layer)] += latent_sums(sae, tuned) - latent_sums(sae, base)
    return out


def sae_on_diff(sae_by_layer: dict[int, SAE], diffs) -> dict[int, np.ndarray]:
    """sum_tokens SAE.encode(act_ft - act_base) per layer (caft_method.md 2.3 item 3).

    Args:
      sae_by_layer: {layer: SAE}.
      diffs: {layer: (act_ft - act_base) [n, d]} (e.g. ``capture_pairs`` output), or an iterable of such dicts
        (e.g. ``iter_pairs(..., diff_only=True)``). Layers without an SAE are ignored.
    Returns:
      {layer: float64 [d_sae]}; rank with ``rank_latents(..., positive_only=True)``.
    """
    out = {int(layer): np.zeros(sae.d_sae, np.float64) for layer, sae in sae_by_layer.items()}
    for chunk in _chunks(diffs):
        for layer, diff in chunk.items():
            if int(layer) in out:
                out[int(layer)] += latent_sums(sae_by_layer[layer], diff)
    return out


def rank_latents(
    scores: dict[int, np.ndarray],
    k: int,
    *,
    per_layer: bool = True,
    largest: bool = True,
    positive_only: bool = False,
) -> dict[int, list[int]]:
    """Top-k latents by score, per layer or globally across layers.

    Args:
      scores: {layer: [d_sae]} (attribution effects, latent-sum differences, ...).
      k: latents to keep per layer (per_layer=True) or in total over all layers (per_layer=False: the authors'
        flattened global top-k of the spurious tasks).
      largest: rank by the signed value descending (the authors' ``topk(effect)``); False ranks ascending
        (``topk(-effect)``).
      positive_only: keep only latents whose score has the ranked sign (> 0 when largest, < 0 otherwise), as the
        authors do for the mean-difference rankings.
    Returns:
      {layer: [latent ids, best first]} with every input layer present (possibly an empty list). Ties break by
      layer, then latent index.
    """
    if k < 0:
        raise ConfigError(f"k must be non-negative, got {k}.")
    sign = 1.0 if largest else -1.0
    entries = []  # (layer, ids, signed scores) sorted per layer
    for layer in sorted(int(layer) for layer in scores):
        s = sign * np.asarray(scores[layer], np.float64)
        ids = np.arange(len(s))
        if positive_only:
            ids = ids[s > 0]
        order = ids[np.lexsort((ids, -s[ids]))]
        entries.append((layer, order, s[order]))
    if per_layer:
        return {layer: [int(i) for i in ids[:k]] for layer, ids, _ in entries}
    flat = [(-float(v), layer, int(i)) for layer, ids, vals in entries for i, v in zip(ids, vals, strict=True)]
    flat.sort()
    out: dict[int, list[int]] = {layer: [] for layer, _, _ in entries}
    for _, layer, i in flat[:k]:
        out[layer].append(i)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ranking files
# ---------------------------------------------------------------------------------------------------------------

# How latents are scored (caft_method.md 2.3): attribution to a metric on the base model, or latent sums over the
# fine-tuned minus the base model's activations; the difference rankings keep positive scores only, as the
# authors do.
RANKINGS = ("attribution", "mean_diff", "on_diff")
RANKING_FILE, SCORES_FILE = "sae_ranking.json", "sae_effects.npz"


def save_ranking(
    folder: pathlib.Path, method: str, scores: dict[int, np.ndarray], k: int, *, per_layer: bool = True,
    metadata: dict | None = None,
) -> dict[int, list[int]]:  # fmt: skip
    """Write folder/sae_effects.npz (every latent's score) and folder/sae_ranking.json (the top-``k`` latents per
    layer, or across layers when not ``per_layer``, best first, with their scores); returns the ranking."""
    if method not in RANKINGS:
        raise ConfigError(f"ranking must be one of {RANKINGS}; got {method!r}.")
    ranked = rank_latents(scores, k, per_layer=per_layer, positive_only=method != "attribution")
    np.savez(folder / SCORES_FILE, **{f"layer_{layer}": v for layer, v in scores.items()})
    report = {
        "ranking_method": method,
        "per_layer": per_layer,
        "k": k,
        **(metadata or {}),
        "ranking": {
            str(layer): [{"latent": int(i), "score": float(scores[layer][i])} for i in ids]
            for layer, ids in ranked.items()
        },
    }
    (folder / RANKING_FILE).write_text(json.dumps(report, indent=2))
    return ranked


def load_ranking(path: str | os.PathLike) -> tuple[dict[int, list[int]], dict]:
    """The ranking {layer: [latent ids, best first]} and the whole record of a ``save_ranking`` file."""
    where = f"SAE ranking {path}"
    try:
        report = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        ranked = {int(layer): [int(e["latent"]) for e in entries] for layer, entries in report["ranking"].items()}
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist; make it with `python -m caft_jax.discover sae`.") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(
            f"{where} is not a ranking that `python -m caft_jax.discover sae` wrote; make it again with that command."
        ) from None
    return ranked, report
