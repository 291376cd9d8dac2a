"""Feature displays: max- and min-activating contexts of PCs, concept directions or SAE latents, as HTML + JSON.

As in the authors' displays (caft_method.md section 2.5): texts from any local corpus are run through the same
jitted ``forward`` as training (with a ``Capture`` and no LM head), batch by batch; each feature's value at every
token is the projection ``act @ direction`` (PCs, concept directions) or the latent activation ``encode(act)``
(SAE latents). Per text only its extreme token counts: a feature keeps the ``k`` texts with the largest maximum
value (its "+" side) and, for directions, the ``k`` texts with the most negative minimum value ("-" side; a PC's
sign is arbitrary, so both are shown). Each context is a token window around the extreme (peak) token. The first
real token of each text (BOS / attention sink) and padding never count as peaks, as the authors zero them.

``write_display_report`` writes one self-contained HTML file (inline CSS, no scripts, no external assets; opens
from disk without a server) and a JSON file with the same content.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.data import pad_token_id
from caft_jax.errors import CaftError, DataError
from caft_jax.model.transformer import Capture, Model, forward

Encoder = Callable[[object], object]  # activations [n, d] -> feature values [n, F] (numpy or jax)


class DisplayError(CaftError):
    """Arguments for feature displays are malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """One text's window around a feature's extreme token.

    Attributes:
      text_index: index of the text in the corpus (order of iteration).
      position: index of the peak token among the text's tokens (after truncation to max_len).
      tokens: [w] decoded token strings of the window (w <= window; shorter at text boundaries).
      token_ids: [w] token ids.
      values: [w] feature value at each window token (the first token of a text, never a peak, included).
      peak: index of the peak token inside the window.
      peak_value: the feature value at the peak (the text's max for "+", its min for "-").
    """

    text_index: int
    position: int
    tokens: list[str]
    token_ids: list[int]
    values: list[float]
    peak: int
    peak_value: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FeatureDisplay:
    """Everything shown for one feature.

    Attributes:
      layer: model layer of the feature.
      index: the feature's id within its layer (PC index or SAE latent id): what a selection file lists.
      kind: "pc", "latent" or "direction".
      score: explained variance (ratio) of a PC or attribution score of a latent, or None.
      score_name: what ``score`` is (e.g. "explained_variance_ratio", "attribution").
      max_contexts: up to k contexts with the largest maximum value, descending ("+" side).
      min_contexts: up to k contexts with the most negative minimum value, ascending ("-" side; empty for SAE
        latents, which are non-negative).
    """

    layer: int
    index: int
    kind: str
    score: float | None = None
    score_name: str | None = None
    max_contexts: list[Context] = dataclasses.field(default_factory=list)
    min_contexts: list[Context] = dataclasses.field(default_factory=list)

    @property
    def selection_hint(self) -> str:
        """The entry to put in a selection file to ablate this feature, e.g. ``"12": [3]``."""
        return f'"{self.layer}": [{self.index}]'

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "index": self.index,
            "kind": self.kind,
            "score": self.score,
            "score_name": self.score_name,
            "selection_hint": self.selection_hint,
            "max_contexts": [c.to_dict() for c in self.max_contexts],
            "min_contexts": [c.to_dict() for c in self.min_contexts],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureDisplay:
        return cls(
            layer=int(d["layer"]),
            index=int(d["index"]),
            kind=d["kind"],
            score=d.get("score"),
            score_name=d.get("score_name"),
            max_contexts=[Context(**c) for c in d.get("max_contexts", [])],
            min_contexts=[Context(**c) for c in d.get("min_contexts", [])],
        )


# ---------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------


def _record_text(record, field: str | None) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if field is not None:
        value = record.get(field)
        return value if isinstance(value, str) else None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    if isinstance(record.get("prompt"), str):
        return record["prompt"] + str(record.get("target", record.get("completion", "")))
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return f"Question: {record['question']}\nAnswer: {record['answer']}"
    return None


def iter_texts(path: str | os.PathLike, *, field: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Stream texts from a local corpus file.

    Args:
      path: ``.jsonl`` (one JSON object per line: ``field``, else "text", else chat "messages" joined, else
        "prompt" + "target", else "question"/"answer"; a line may also be a bare JSON string) or ``.txt``
        (documents separated by blank lines).
      field: the JSONL field holding the text (default: detected per record as above).
      limit: stop after this many texts.
    Yields:
      non-empty strings.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found; pass an existing .jsonl or .txt file.")
    count = 0

    def done():
        return limit is not None and count >= limit

    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if done():
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path} line {line_no}: invalid JSON ({e.msg}); write one object per line."
                    ) from None
                text = _record_text(record, field)
                if text is None:
                    want = repr(field) if field else "'text', 'messages', 'prompt' or 'question'/'answer'"
                    raise DataError(f"{path} line {line_no}: no text field {want}; pass field= to name it.")
                if text.strip():
                    count += 1
                    yield text
    elif path.suffix == ".txt":
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in [*f, "\n"]:
                if line.strip():
                    block.append(line)
                    continue
                if block and not done():
                    count += 1
                    yield "".join(block).rstrip("\n")
                block = []
    else:
        raise DataError(f"{path}: unsupported corpus format {path.suffix!r}; use .jsonl or .txt.")


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


@functools.partial(jax.jit, static_argnames=("capture",))
def _captured(model: Model, tokens, attn_mask, capture: Capture):
    return forward(model, tokens, attn_mask=attn_mask, capture=capture, logits=False).captured  # [n, b, t, d]


@jax.jit
def _project(acts, directions):
    return jnp.einsum("btd,fd->btf", acts, directions, preferred_element_type=jnp.float32)  # [b, t, F]


def _bucket(length: int, max_len: int) -> int:
    t = 16
    while t < length:
        t *= 2
    return min(t, max_len)


def _batches(tokenizer, texts: Iterable[str], batch_size: int, max_len: int, pad_id: int):
    """Yield (first_text_index, n_rows, tokens [b, t] int32, attn_mask [b, t] bool), left-padded to a bucket."""
    start = 0
    chunk: list[str] = []

    def encode(chunk):
        ids = tokenizer(list(chunk), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        ids = [x if len(x) else [pad_id] for x in ids]  # an empty encoding still occupies its row
        t = _bucket(max(len(x) for x in ids), max_len)
        tokens = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), bool)
        mask[len(ids) :, -1] = True  # filler rows: one visible token so attention has a key
        for r, x in enumerate(ids):
            tokens[r, t - len(x) :] = x
            mask[r, t - len(x) :] = True
        return tokens, mask

    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"corpus item {start + len(chunk)} is {type(text).__name__}, not a string.")
        chunk.append(text)
        if len(chunk) == batch_size:
            yield start, len(chunk), *encode(chunk)
            start += len(chunk)
            chunk = []
    if chunk:
        yield start, len(chunk), *encode(chunk)


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
    progress: bool = True,
) -> list[FeatureDisplay]:
    """Max- and min-activating contexts for features at several layers, in one streaming pass over a corpus.

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
      progress: show a progress bar.
    Returns:
      FeatureDisplay per feature, ordered by layer then feature.
    """
    if isinstance(texts, (str, os.PathLike)):
        texts = iter_texts(texts, limit=max_texts)
    elif max_texts is not None:
        texts = (t for i, t in zip(range(max_texts), texts, strict=False))
    if k < 1 or window < 1 or batch_size < 1:
        raise DisplayError(
            f"k, window and batch_size must be positive; got k={k}, window={window}, batch_size={batch_size}."
        )
    spec = model.spec
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
    capture = Capture(layers, site, jnp.float32)
    offsets = _window_offsets(window)
    pad_id = pad_token_id(tokenizer)
    tops: dict[int, tuple[_TopK, _TopK | None]] = {}
    batches = _batches(tokenizer, texts, batch_size, max_len, pad_id)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="displays", unit="batch")
    for start, n_rows, tokens, mask in batches:
        captured = _captured(model, jnp.asarray(tokens), jnp.asarray(mask), capture)
        valid = mask.copy()
        valid[n_rows:] = False
        if exclude_first:
            valid &= np.cumsum(mask, axis=1) > 1
        for i, layer in enumerate(layers):
            if layer in dirs:
                values = np.asarray(_project(captured[i], dirs[layer]), np.float64)  # [b, t, F]
            else:
                acts = captured[i]
                flat = features[layer](acts.reshape(-1, acts.shape[-1]))
                values = np.asarray(flat, np.float64).reshape(*acts.shape[:2], -1)
            n_feat = values.shape[-1]
            if layer not in tops:
                signs = both_signs if both_signs is not None else layer in dirs
                tops[layer] = (_TopK(n_feat, k, window), _TopK(n_feat, k, window) if signs else None)
            hi, lo = tops[layer]
            if hi.values.shape[0] != n_feat:
                raise DisplayError(f"the encoder for layer {layer} changed its number of features between batches.")
            hi.merge(*_candidates(values, tokens, mask, valid, start, offsets, 1.0))
            if lo is not None:
                lo.merge(*_candidates(values, tokens, mask, valid, start, offsets, -1.0))
    if not tops:
        raise DataError("the corpus has no texts; nothing to display.")
    return _assemble(tops, tokenizer, feature_ids, scores, score_name, kind, dirs)


def _assemble(tops, tokenizer, feature_ids, scores, score_name, kind, dirs) -> list[FeatureDisplay]:
    decode_cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in decode_cache:
            decode_cache[i] = tokenizer.decode([i])
        return decode_cache[i]

    def contexts(top: _TopK | None, f: int, sign: float) -> list[Context]:
        if top is None:
            return []
        out = []
        for j in range(top.values.shape[1]):
            if not np.isfinite(top.values[f, j]):
                continue
            ids = top.win_ids[f, j]
            keep = ids >= 0
            out.append(
                Context(
                    text_index=int(top.text[f, j]),
                    position=int(top.pos[f, j]),
                    tokens=[decode(int(i)) for i in ids[keep]],
                    token_ids=[int(i) for i in ids[keep]],
                    values=[float(v) for v in top.win_vals[f, j][keep]],
                    peak=int(top.win_peak[f, j]),
                    peak_value=float(sign * top.values[f, j]),
                )
            )
        return out

    displays = []
    for layer, (hi, lo) in tops.items():
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


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em} h2{font-size:1.15em;margin:1.6em 0 .3em;border-top:1px solid #ccc;padding-top:.8em}
h3{font-size:.95em;margin:.7em 0 .2em;color:#444}
.meta{color:#555;font-size:.9em} code{background:#f3f3f3;padding:0 .3em;border-radius:3px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;margin:.15em 0;
line-height:1.7}
.val{display:inline-block;min-width:6em;color:#666}
.tok{border-radius:2px}
.peak{outline:2px solid #000;font-weight:bold}
table{border-collapse:collapse;font-size:.85em} td,th{padding:.15em .6em;border-bottom:1px solid #eee;text-align:left}
.cols{display:flex;gap:2em;flex-wrap:wrap} .cols>div{flex:1;min-width:28em}
"""


def _colour(value: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0) * 0.8
    rgb = "220,40,40" if value > 0 else "40,90,220"
    return f"background:rgba({rgb},{alpha:.3f})"


def _token_html(token: str) -> str:
    shown = token.replace("\n", "\u21b5").replace("\t", "\u21e5")
    return html.escape(shown if shown else "\u2205")


def _context_html(ctx: Context, scale: float) -> str:
    spans = []
    for j, (tok, v) in enumerate(zip(ctx.tokens, ctx.values, strict=True)):
        cls = "tok peak" if j == ctx.peak else "tok"
        spans.append(f'<span class="{cls}" style="{_colour(v, scale)}" title="{v:.4g}">{_token_html(tok)}</span>')
    return (
        f'<div class="ctx"><span class="val">{ctx.peak_value:+.4g}</span>'
        f'{"".join(spans)} <span class="meta">[text {ctx.text_index}, token {ctx.position}]</span></div>'
    )


def _feature_name(f: FeatureDisplay) -> str:
    return {"pc": "PC", "latent": "latent", "direction": "direction"}.get(f.kind, f.kind)


def _side_title(contexts: Sequence[Context], *, positive: bool) -> str:
    """A column heading that claims a sign only when every peak on that side has it."""
    name, sign, bound = ("max-activating", "+", "\u2264") if positive else ("min-activating", "\u2212", "\u2265")
    peaks = [c.peak_value for c in contexts]
    if not peaks:
        return name
    if all((v > 0) if positive else (v < 0) for v in peaks):
        return f"{name} (sign {sign})"
    if all((v <= 0) if positive else (v >= 0) for v in peaks):
        return f"{name} (every value {bound} 0: the feature has no {'positive' if positive else 'negative'} side here)"
    return f"{name} (mixed signs)"


def _section_html(f: FeatureDisplay) -> str:
    # scale by the peaks, not every window value: a window may include the (never-peak) attention-sink token
    scale = max((abs(c.peak_value) for c in f.max_contexts + f.min_contexts), default=0.0)
    score = "" if f.score is None else f" &middot; {html.escape(f.score_name or 'score')} = {f.score:.4g}"
    parts = [
        f'<h2 id="L{f.layer}-F{f.index}">Layer {f.layer} &middot; {_feature_name(f)} {f.index}{score}</h2>',
        f'<div class="meta">selection file entry: <code>{html.escape(f.selection_hint)}</code></div>',
        '<div class="cols">',
    ]
    sides = [(_side_title(f.max_contexts, positive=True), f.max_contexts)]
    if f.min_contexts or f.kind != "latent":
        sides.append((_side_title(f.min_contexts, positive=False), f.min_contexts))
    for title, ctxs in sides:
        body = "".join(_context_html(c, scale) for c in ctxs) or '<div class="meta">no contexts</div>'
        parts.append(f"<div><h3>{title}</h3>{body}</div>")
    parts.append("</div>")
    return "\n".join(parts)


def render_html(features: Sequence[FeatureDisplay], title: str = "CAFT feature displays") -> str:
    """The report as one HTML string (inline CSS, no scripts, no external references)."""
    rows = "".join(
        f'<tr><td><a href="#L{f.layer}-F{f.index}">{f.layer}</a></td><td>{_feature_name(f)} {f.index}</td>'
        f"<td>{'' if f.score is None else f'{f.score:.4g}'}</td>"
        f"<td><code>{html.escape(f.selection_hint)}</code></td></tr>"
        for f in features
    )
    body = "\n".join(_section_html(f) for f in features)
    legend = (
        "Each line is one text's window around the feature's extreme token (outlined); colour shows the feature's "
        "value (red positive, blue negative; hover a token for its value). The number on the left is the peak "
        'value. To ablate a feature, add its entry to a selection file such as <code>{"12": [3, 5]}</code>.'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f'<h1>{html.escape(title)}</h1><p class="meta">{legend}</p>\n'
        "<table><tr><th>layer</th><th>feature</th><th>score</th><th>selection entry</th></tr>"
        f"{rows}</table>\n{body}\n</body></html>\n"
    )


def write_display_report(
    features: Sequence[FeatureDisplay],
    out_dir: str | os.PathLike,
    *,
    title: str = "CAFT feature displays",
    name: str = "displays",
) -> dict[str, pathlib.Path]:
    """Write ``{out_dir}/{name}.html`` (self-contained) and ``{out_dir}/{name}.json`` (same content).

    The JSON is ``{"title": str, "features": [FeatureDisplay.to_dict(), ...]}``. Returns {"html": path, "json": path}.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / f"{name}.html", out / f"{name}.json"
    html_path.write_text(render_html(features, title), encoding="utf-8")
    payload = {"title": title, "features": [f.to_dict() for f in features]}
    json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"html": html_path, "json": json_path}


def load_display_json(path: str | os.PathLike) -> list[FeatureDisplay]:
    """Read the features back from a report's JSON (e.g. for autointerp)."""
    path = pathlib.Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return [FeatureDisplay.from_dict(d) for d in payload["features"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a display report JSON ({e}); write one with write_display_report.") from None
