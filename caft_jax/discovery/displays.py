"""Feature displays: max- and min-activating contexts of PCs, concept directions or SAE latents, as HTML + JSON.

As in the authors' displays (caft_method.md section 2.5): texts from any local corpus are run through the same
jitted ``forward`` as training (with a ``Capture`` and no LM head), batch by batch; each feature's value at every
token is the projection ``act @ direction`` (PCs, concept directions) or the latent activation ``encode(act)``
(SAE latents). Per text only its extreme token counts: a feature keeps the ``k`` texts with the largest maximum
value (its "+" side) and, for directions, the ``k`` texts with the most negative minimum value ("-" side; a PC's
sign is arbitrary, so both are shown). Each context is a token window around the extreme (peak) token. The first
real token of each text (BOS / attention sink) and padding never count as peaks, as the authors zero them.

Alongside the extremes, a random sample of texts gives contexts at quantiles of the per-text peak, a random sample
of tokens the histogram, and the LM head the tokens a direction promotes and suppresses. The records (``Context``,
``FeatureDisplay``) and the HTML / JSON report (``write_display_report``) are in ``display_report``; corpora are
read by ``corpus``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.data import pad_token_id
from caft_jax.discovery.capture import capture_step
from caft_jax.discovery.corpus import iter_texts, text_batches
from caft_jax.discovery.display_report import Context, FeatureDisplay
from caft_jax.errors import CaftError, DataError
from caft_jax.model.transformer import Capture, Model, lm_head

Encoder = Callable[[object], object]  # activations [n, d] -> feature values [n, F] (numpy or jax)


class DisplayError(CaftError):
    """Arguments for feature displays are malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Streaming top-k
# ---------------------------------------------------------------------------------------------------------------


class _TopK:
    """Per feature, the k largest (value, text, position, window) seen so far. Values of shape [F, k]."""

    def __init__(self, n_features: int, k: int, window: int):
        self.values = np.full((n_features, k), -np.inf)
        self.text = np.full((n_features, k), -1, np.int64)
        self.pos = np.zeros((n_features, k), np.int64)
        self.win_ids = np.full((n_features, k, window), -1, np.int64)
        self.win_vals = np.zeros((n_features, k, window), np.float64)
        self.win_peak = np.zeros((n_features, k), np.int64)

    def merge(self, values, text, pos, win_ids, win_vals, win_peak):
        """Merge candidates: values/text/pos/win_peak [F, b], win_ids/win_vals [F, b, w]."""
        k = self.values.shape[1]
        cat = lambda a, b: np.concatenate([a, b], axis=1)  # noqa: E731
        all_values = cat(self.values, values)
        # stable sort on -value: ties keep the earlier text first
        order = np.argsort(-all_values, axis=1, kind="stable")[:, :k]  # [F, k]
        take = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        self.values = take(all_values)
        self.text = take(cat(self.text, text))
        self.pos = take(cat(self.pos, pos))
        self.win_ids = take(cat(self.win_ids, win_ids))
        self.win_vals = take(cat(self.win_vals, win_vals))
        self.win_peak = take(cat(self.win_peak, win_peak))


@jax.jit
def _project(acts, directions):
    return jnp.einsum("btd,fd->btf", acts, directions, preferred_element_type=jnp.float32)  # [b, t, F]


class _Sample:
    """Per feature: exact token counts and sums, a uniform random sample of token values (for the histogram) and a
    uniform random sample of texts' peak windows (for contexts at quantiles, not only the extremes).

    Random keys with "keep the largest keys" make both samples uniform without knowing the corpus size.
    """

    def __init__(self, n_features: int, window: int, *, tokens_kept: int = 8192, texts_kept: int = 64, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.tokens_kept = tokens_kept
        self.keys = np.empty(0)
        self.values = np.empty((0, n_features))
        self.n_tokens = 0
        self.positive = np.zeros(n_features, np.int64)
        self.total = np.zeros(n_features)
        self.texts = _TopK(n_features, texts_kept, window)

    def add(self, values: np.ndarray, valid: np.ndarray, peak_candidates: tuple) -> None:
        """values [b, t, F] and valid [b, t] of one batch, and its max-side ``_candidates``."""
        flat = values[valid]  # [n, F]
        self.n_tokens += len(flat)
        self.positive += (flat > 0).sum(0)
        self.total += flat.sum(0)
        keys = np.concatenate([self.keys, self.rng.random(len(flat))])
        kept = np.concatenate([self.values, flat])
        if len(keys) > self.tokens_kept:
            top = np.argpartition(-keys, self.tokens_kept)[: self.tokens_kept]
            keys, kept = keys[top], kept[top]
        self.keys, self.values = keys, kept
        best = peak_candidates[0]
        text_keys = np.where(np.isfinite(best), self.rng.random(best.shape), -np.inf)
        self.texts.merge(text_keys, *peak_candidates[1:])

    def histogram(self, f: int, bins: int = 30) -> dict | None:
        if not self.n_tokens:
            return None
        counts, edges = np.histogram(self.values[:, f], bins=bins)
        return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n_tokens": self.n_tokens,
                "positive_fraction": float(self.positive[f] / self.n_tokens),
                "mean": float(self.total[f] / self.n_tokens)}  # fmt: skip

    def peak_values(self, f: int, slots) -> np.ndarray:
        """Peak values of sampled texts: the window's slot at offset 0 (``win_peak`` counts only in-text slots)."""
        center = int(-_window_offsets(self.texts.win_ids.shape[2])[0])
        return self.texts.win_vals[f, slots, center]

    def quantile_picks(self, f: int, quantiles: Sequence[float]) -> list[tuple[float, int]]:
        """(quantile, slot in ``texts``) of the sampled texts whose peak is nearest each quantile of the sample."""
        slots = np.flatnonzero(np.isfinite(self.texts.values[f]))
        if len(slots) == 0:
            return []
        peaks = self.peak_values(f, slots)
        order = slots[np.argsort(peaks, kind="stable")]
        picks, used = [], set()
        for q in quantiles:
            slot = int(order[min(int(q * len(order)), len(order) - 1)])
            if slot not in used:
                used.add(slot)
                picks.append((float(q), slot))
        return picks


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _window_offsets(window: int) -> np.ndarray:
    """Offsets of a window around the peak: about three quarters before it (the model reads left to right)."""
    after = window // 4
    return np.arange(-(window - after - 1), after + 1)


def _candidates(values, tokens, mask, valid, text_start, offsets, sign: float):
    """Per row and feature, the extreme token (max of sign * value) and its window.

    Args:
      values: [b, t, F] float feature values; tokens: [b, t] ids; mask: [b, t] bool real tokens (left-padded);
        valid: [b, t] bool tokens that may be peaks.
    Returns:
      (best [F, b], text [F, b], pos [F, b], win_ids [F, b, w], win_vals [F, b, w], win_peak [F, b]); rows with
      no valid token get best = -inf.
    """
    b, t, n_feat = values.shape
    signed = np.where(valid[..., None], sign * values, -np.inf)  # [b, t, F]
    peak = signed.argmax(1)  # [b, F]
    best = np.take_along_axis(signed, peak[:, None, :], 1)[:, 0]  # [b, F]
    real_start = mask.argmax(1)  # [b] index of each row's first real token
    idx = peak[..., None] + offsets  # [b, F, w]
    inside = (idx >= real_start[:, None, None]) & (idx < t)
    idx_c = np.clip(idx, 0, t - 1)
    win_ids = np.where(
        inside, np.take_along_axis(tokens[:, None, :], idx_c.reshape(b, 1, -1), 2).reshape(idx.shape), -1
    )
    vals_ft = np.moveaxis(values, 2, 1)  # [b, F, t]
    win_vals = np.where(inside, np.take_along_axis(vals_ft, idx_c, 2), 0.0)
    first_in = inside.argmax(-1)  # [b, F] index of the first in-window slot
    win_peak = -offsets[0] - first_in
    pos = peak - real_start[:, None]
    rows = np.arange(b) + text_start
    f = lambda a: np.moveaxis(a, 0, 1)  # noqa: E731 - [b, F, ...] -> [F, b, ...]
    return (
        f(best),
        f(np.broadcast_to(rows[:, None], (b, n_feat))),
        f(pos),
        f(np.where(inside, win_ids, -1)),
        f(win_vals),
        f(win_peak),
    )


def top_contexts_by_layer(
    model: Model,
    tokenizer,
    texts: Iterable[str] | str | os.PathLike,
    features: Mapping[int, np.ndarray | Encoder],
    *,
    k: int = 20,
    window: int = 16,
    site: str = "resid_post",
    batch_size: int = 8,
    max_len: int = 1024,
    both_signs: bool | None = None,
    feature_ids: Mapping[int, Sequence[int]] | None = None,
    scores: Mapping[int, Sequence[float]] | None = None,
    score_name: str | None = None,
    kind: str | None = None,
    exclude_first: bool = True,
    max_texts: int | None = None,
    top_tokens: int = 10,
    progress: bool = True,
) -> list[FeatureDisplay]:
    """Displays of features at several layers, in one streaming pass over a corpus: max- and min-activating
    contexts, contexts at quantiles of a random sample of texts, a histogram of the values over a random sample of
    tokens, and the tokens each direction promotes and suppresses through the unembedding.

    Args:
      model: the model (usually the base model).
      tokenizer: its Hugging Face tokenizer (texts are tokenised with special tokens, truncated to max_len).
      texts: an iterable of strings, or the path of a .jsonl / .txt corpus (see ``iter_texts``).
      features: {layer: directions [F, d] (PCs / concept directions; value = act @ direction), an encoder
        function acts [n, d] -> values [n, F], or an object with such an ``encode`` method (an SAE)}. Values are
        ranked on the host in float64, so give an SAE restricted to the latents to show (``latent_encoder``)
        rather than all of its tens of thousands of latents.
      k: contexts kept per feature and side.
      window: tokens per context window.
      site: "resid_post" or "resid_mid".
      batch_size, max_len: streaming batch shape (lengths are bucketed to powers of two, at least 16).
      both_signs: also collect min-activating contexts (default: True for directions, False for encoders).
      feature_ids: {layer: [F] ids} shown and put in selection hints (default 0..F-1).
      scores, score_name: {layer: [F]} explained variance or attribution to show, and its name.
      kind: "pc", "latent" or "direction" (default: "pc" for arrays, "latent" for encoders).
      exclude_first: never pick a text's first real token (BOS / attention sink) as a peak.
      max_texts: stop after this many texts.
      top_tokens: promoted / suppressed tokens listed per feature (directions, and SAEs with ``W_dec``); 0: none.
      progress: show a progress bar.
    Returns:
      FeatureDisplay per feature, ordered by layer then feature.
    """
    texts = _corpus(texts, max_texts)
    if k < 1 or window < 1 or batch_size < 1:
        raise DisplayError(
            f"k, window and batch_size must be positive; got k={k}, window={window}, batch_size={batch_size}."
        )
    original = dict(features)
    layers, features, dirs = _prepare_features(model.spec, features)
    tops = _collect_top_k(
        model,
        tokenizer,
        texts,
        layers,
        features,
        dirs,
        k=k,
        window=window,
        site=site,
        batch_size=batch_size,
        max_len=max_len,
        both_signs=both_signs,
        exclude_first=exclude_first,
        progress=progress,
    )
    if not tops:
        raise DataError("the corpus has no texts; nothing to display.")
    effects = {}
    for layer in layers:
        rows = dirs.get(layer, getattr(original.get(layer), "W_dec", None))  # a direction, or an SAE's decoder rows
        if rows is not None and top_tokens:
            effects[layer] = token_effects(model, tokenizer, rows, top_tokens)
    return _assemble(tops, tokenizer, feature_ids, scores, score_name, kind, dirs, effects)


def token_effects(model: Model, tokenizer, directions, n: int = 10) -> list[tuple[list, list]]:
    """Per direction [F, d]: its n most promoted and n most suppressed tokens through the final norm and
    unembedding, as ([(token, logit)], [(token, logit)]).

    ``lm_head`` applies the final RMSNorm, which only rescales a single vector, and the monotone soft-cap, so the
    ranking is that of (norm weight * direction) @ W_U: the logit-lens reading of a direction.
    """
    logits = np.asarray(lm_head(model, jnp.asarray(directions, jnp.float32)), np.float64)  # [F, V]
    n = min(n, logits.shape[1])
    out = []
    for row in logits:
        up = np.argsort(-row, kind="stable")[:n]
        down = np.argsort(row, kind="stable")[:n]
        out.append(([(tokenizer.decode([int(i)]), float(row[i])) for i in up],
                    [(tokenizer.decode([int(i)]), float(row[i])) for i in down]))  # fmt: skip
    return out


def _corpus(texts: Iterable[str] | str | os.PathLike, max_texts: int | None) -> Iterable[str]:
    """The texts to stream: a corpus file read with ``iter_texts``, or the iterable itself; at most max_texts."""
    if isinstance(texts, (str, os.PathLike)):
        texts = iter_texts(texts, limit=max_texts)
    elif max_texts is not None:
        texts = (t for i, t in zip(range(max_texts), texts, strict=False))
    return texts


def _prepare_features(spec, features: Mapping[int, np.ndarray | Encoder]):
    """(sorted layers, {layer: directions or encoder}, {layer: directions [F, d] float32 on device}) after checks.

    An object with an ``encode`` method (an SAE) stands for that method; 1-D directions become one row.
    """
    layers = tuple(sorted(int(layer) for layer in features))
    if not layers:
        raise DisplayError("no features given; pass {layer: directions [F, d]} or {layer: encode_fn}.")
    for layer in layers:
        if not 0 <= layer < spec.n_layers:
            raise DisplayError(f"layer {layer} is out of range; the model has layers 0..{spec.n_layers - 1}.")
    dirs: dict[int, jax.Array] = {}
    features = {layer: getattr(f, "encode", f) for layer, f in features.items()}  # an SAE object: its encoder
    for layer in layers:
        f = features[layer]
        if not callable(f):
            f = np.asarray(f, np.float32)
            if f.ndim == 1:
                f = f[None]
            if f.ndim != 2 or f.shape[1] != spec.d_model:
                raise DisplayError(
                    f"directions for layer {layer} must be [F, d_model={spec.d_model}]; got shape {f.shape}."
                )
            dirs[layer] = jnp.asarray(f)
    return layers, features, dirs


def _peak_mask(mask: np.ndarray, n_rows: int, exclude_first: bool) -> np.ndarray:
    """[b, t] bool: the tokens of a batch that may be peaks (real tokens of real rows, minus each first token)."""
    valid = mask.copy()
    valid[n_rows:] = False
    if exclude_first:
        valid &= np.cumsum(mask, axis=1) > 1
    return valid


def _feature_values(acts, directions, encoder) -> np.ndarray:
    """float64 [b, t, F] feature values of one layer's activations [b, t, d] (directions when given, else encoder)."""
    if directions is not None:
        return np.asarray(_project(acts, directions), np.float64)  # [b, t, F]
    flat = encoder(acts.reshape(-1, acts.shape[-1]))
    return np.asarray(flat, np.float64).reshape(*acts.shape[:2], -1)


def _layer_tops(tops: dict, layer: int, n_feat: int, k: int, window: int, both_signs: bool | None, is_direction: bool):
    """The (max side, min side or None, sample) of a layer, created on its first batch."""
    if layer not in tops:
        signs = both_signs if both_signs is not None else is_direction
        tops[layer] = (_TopK(n_feat, k, window), _TopK(n_feat, k, window) if signs else None,
                       _Sample(n_feat, window, seed=layer))  # fmt: skip
    hi, lo, sample = tops[layer]
    if hi.values.shape[0] != n_feat:
        raise DisplayError(f"the encoder for layer {layer} changed its number of features between batches.")
    return hi, lo, sample


def _collect_top_k(
    model: Model,
    tokenizer,
    texts: Iterable[str],
    layers: tuple[int, ...],
    features: Mapping[int, np.ndarray | Encoder],
    dirs: Mapping[int, jax.Array],
    *,
    k: int,
    window: int,
    site: str,
    batch_size: int,
    max_len: int,
    both_signs: bool | None,
    exclude_first: bool,
    progress: bool,
) -> dict[int, tuple[_TopK, _TopK | None, _Sample]]:
    """One streaming pass over the corpus: {layer: (max-side top-k, min-side top-k or None, sample)} (empty: no
    texts)."""
    capture = Capture(layers, site, jnp.float32)
    offsets = _window_offsets(window)
    pad_id = pad_token_id(tokenizer)
    tops: dict[int, tuple[_TopK, _TopK | None, _Sample]] = {}
    batches = text_batches(tokenizer, texts, batch_size, max_len, pad_id)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="displays", unit="batch")
    for start, n_rows, tokens, mask in batches:
        captured = capture_step(model, jnp.asarray(tokens), jnp.asarray(mask), None, None, None, capture)
        valid = _peak_mask(mask, n_rows, exclude_first)
        for i, layer in enumerate(layers):
            values = _feature_values(captured[i], dirs.get(layer), features[layer])
            hi, lo, sample = _layer_tops(tops, layer, values.shape[-1], k, window, both_signs, layer in dirs)
            peaks = _candidates(values, tokens, mask, valid, start, offsets, 1.0)
            hi.merge(*peaks)
            sample.add(values, valid, peaks)
            if lo is not None:
                lo.merge(*_candidates(values, tokens, mask, valid, start, offsets, -1.0))
    return tops


def _assemble(tops, tokenizer, feature_ids, scores, score_name, kind, dirs, effects) -> list[FeatureDisplay]:
    decode_cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in decode_cache:
            decode_cache[i] = tokenizer.decode([i])
        return decode_cache[i]

    def context(top: _TopK, f: int, j: int, peak_value: float) -> Context:
        ids = top.win_ids[f, j]
        keep = ids >= 0
        return Context(
            text_index=int(top.text[f, j]),
            position=int(top.pos[f, j]),
            tokens=[decode(int(i)) for i in ids[keep]],
            token_ids=[int(i) for i in ids[keep]],
            values=[float(v) for v in top.win_vals[f, j][keep]],
            peak=int(top.win_peak[f, j]),
            peak_value=float(peak_value),
        )

    def contexts(top: _TopK | None, f: int, sign: float) -> list[Context]:
        if top is None:
            return []
        slots = [j for j in range(top.values.shape[1]) if np.isfinite(top.values[f, j])]
        return [context(top, f, j, sign * top.values[f, j]) for j in slots]

    displays = []
    for layer, (hi, lo, sample) in tops.items():
        n_feat = hi.values.shape[0]
        ids = list(feature_ids[layer]) if feature_ids and layer in feature_ids else list(range(n_feat))
        layer_scores = list(scores[layer]) if scores and layer in scores else [None] * n_feat
        if len(ids) != n_feat or len(layer_scores) != n_feat:
            raise DisplayError(f"layer {layer} has {n_feat} features but {len(ids)} ids / {len(layer_scores)} scores.")
        for f in range(n_feat):
            displays.append(
                FeatureDisplay(
                    layer=layer,
                    index=int(ids[f]),
                    kind=kind or ("pc" if layer in dirs else "latent"),
                    score=None if layer_scores[f] is None else float(layer_scores[f]),
                    score_name=score_name if layer_scores[f] is not None else None,
                    max_contexts=contexts(hi, f, 1.0),
                    min_contexts=contexts(lo, f, -1.0),
                    quantile_contexts=[
                        (q, context(sample.texts, f, j, sample.peak_values(f, j)))
                        for q, j in sample.quantile_picks(f, QUANTILES)
                    ],
                    histogram=sample.histogram(f),
                    promoted_tokens=effects[layer][f][0] if layer in effects else [],
                    suppressed_tokens=effects[layer][f][1] if layer in effects else [],
                )
            )
    return displays


def latent_encoder(sae, ids: Sequence[int]):
    """An SAE restricted to latents ``ids`` (exact: each latent's encoding depends only on its own column).

    Returns an object whose ``encode(acts [n, d]) -> [n, len(ids)]`` matches ``sae.encode(acts)[:, ids]``; pass it
    as a feature set with ``feature_ids={layer: ids}`` so the report shows the SAE's latent ids.
    """
    ids = np.asarray(list(ids), np.int64)
    threshold = sae.threshold if np.ndim(sae.threshold) == 0 else sae.threshold[ids]
    return sae.replace(W_enc=sae.W_enc[:, ids], b_enc=sae.b_enc[ids], W_dec=sae.W_dec[ids], threshold=threshold)


def top_contexts(
    model: Model,
    tokenizer,
    texts: Iterable[str] | str | os.PathLike,
    layer: int,
    features: np.ndarray | Encoder,
    *,
    k: int = 20,
    window: int = 16,
    site: str = "resid_post",
    feature_ids: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    score_name: str | None = None,
    **kwargs,
) -> list[FeatureDisplay]:
    """Max- and min-activating contexts of features at one layer; see ``top_contexts_by_layer`` for arguments.

    ``features`` is directions [F, d] (both signs shown) or an encoder acts [n, d] -> [n, F] (max side only).
    Returns one FeatureDisplay per feature.
    """
    return top_contexts_by_layer(
        model,
        tokenizer,
        texts,
        {layer: features},
        k=k,
        window=window,
        site=site,
        feature_ids=None if feature_ids is None else {layer: feature_ids},
        scores=None if scores is None else {layer: scores},
        score_name=score_name,
        **kwargs,
    )
