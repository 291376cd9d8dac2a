"""Feature display records and their report: one self-contained HTML file and a JSON file with the same content.

A ``FeatureDisplay`` holds what a researcher reads to decide whether a feature is the unwanted concept (collected
by ``displays``): the max- and min-activating ``Context`` windows, windows at several quantiles of the per-text
peaks (what the feature does most of the time, not only at its extremes), a histogram of its values over the
corpus' tokens, the tokens its direction promotes and suppresses through the unembedding, for a PC of fine-tuned
minus base activations the base-versus-fine-tuned projections, and an autointerp explanation when one was made.

``write_display_report`` writes the HTML (inline CSS and SVG, one inline script for search and filters, no
external assets; opens from disk without a server) and the JSON; ``load_display_json`` reads the features back.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from caft_jax.errors import DataError

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
    quantile_contexts: list[tuple[float, Context]] = dataclasses.field(default_factory=list)
    histogram: dict | None = None  # {"edges", "counts", "n_tokens", "positive_fraction", "mean"}
    promoted_tokens: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    suppressed_tokens: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    contrast: dict | None = None  # {"edges", "base_counts", "tuned_counts", "base_mean", "tuned_mean"}
    explanation: str | None = None
    interp_score: float | None = None

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
            "quantile_contexts": [{"quantile": q, "context": c.to_dict()} for q, c in self.quantile_contexts],
            "histogram": self.histogram,
            "promoted_tokens": [list(t) for t in self.promoted_tokens],
            "suppressed_tokens": [list(t) for t in self.suppressed_tokens],
            "contrast": self.contrast,
            "explanation": self.explanation,
            "interp_score": self.interp_score,
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
            quantile_contexts=[(float(q["quantile"]), Context(**q["context"])) for q in d.get("quantile_contexts", [])],
            histogram=d.get("histogram"),
            promoted_tokens=[(str(t), float(v)) for t, v in d.get("promoted_tokens", [])],
            suppressed_tokens=[(str(t), float(v)) for t, v in d.get("suppressed_tokens", [])],
            contrast=d.get("contrast"),
            explanation=d.get("explanation"),
            interp_score=d.get("interp_score"),
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
.panels{display:flex;gap:2em;flex-wrap:wrap;margin:.4em 0} .panel h3{margin-top:.2em}
.expl{background:#f6f6ee;padding:.3em .6em;border-left:3px solid #bb9} .controls{margin:1em 0}
.qrow{display:flex;gap:.6em;align-items:baseline} .q{color:#777;font-size:.8em;min-width:5em}
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


def _histogram_svg(edges: Sequence[float], series: Sequence[tuple[Sequence[float], str]], label: str) -> str:
    """Inline SVG of one or more histograms over the same bin edges (counts scaled to each series' own total)."""
    width, height, pad = 300, 80, 14
    n_bins = len(edges) - 1
    if n_bins < 1:
        return ""
    bar = (width - 2) / n_bins
    shapes = []
    for counts, colour in series:
        total = max(sum(counts), 1)
        peak = max(max(counts) / total, 1e-12)
        for i, c in enumerate(counts):
            h = (height - pad) * (c / total) / peak
            shapes.append(f'<rect x="{1 + i * bar:.1f}" y="{height - pad - h:.1f}" width="{max(bar - 0.5, 0.5):.1f}" '
                          f'height="{h:.1f}" fill="{colour}" fill-opacity="0.55"/>')  # fmt: skip
    lo, hi = edges[0], edges[-1]
    if lo < 0 < hi:
        x0 = 1 + (width - 2) * (0 - lo) / (hi - lo)
        shapes.append(
            f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="0" y2="{height - pad}" stroke="#000" stroke-dasharray="2"/>'
        )
    ticks = (f'<text x="0" y="{height - 2}" font-size="10">{lo:.3g}</text>'
             f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{hi:.3g}</text>')  # fmt: skip
    return (f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="{html.escape(label)}">'
            f"<title>{html.escape(label)}</title>{''.join(shapes)}{ticks}</svg>")  # fmt: skip


def _histogram_panel(f: FeatureDisplay) -> str:
    hist = f.histogram
    if not hist:
        return ""
    svg = _histogram_svg(hist["edges"], [(hist["counts"], "#c33")], "activation histogram")
    note = (f"{hist['n_tokens']:,} tokens; mean {hist['mean']:.3g}; "
            f"{100 * hist['positive_fraction']:.2f}% of tokens &gt; 0")  # fmt: skip
    return f'<div class="panel"><h3>activation histogram</h3>{svg}<div class="meta">{note}</div></div>'


def _contrast_panel(f: FeatureDisplay) -> str:
    c = f.contrast
    if not c:
        return ""
    svg = _histogram_svg(c["edges"], [(c["base_counts"], "#36c"), (c["tuned_counts"], "#c33")], "base vs fine-tuned")
    note = (
        f'<span style="color:#36c">base</span> mean {c["base_mean"]:.3g} &middot; '
        f'<span style="color:#c33">fine-tuned</span> mean {c["tuned_mean"]:.3g} (projection on the task tokens)'
    )
    return f'<div class="panel"><h3>base vs fine-tuned</h3>{svg}<div class="meta">{note}</div></div>'


def _tokens_panel(f: FeatureDisplay) -> str:
    if not (f.promoted_tokens or f.suppressed_tokens):
        return ""
    rows = []
    for (up, up_v), (down, down_v) in zip(f.promoted_tokens, f.suppressed_tokens, strict=False):
        rows.append(f"<tr><td><code>{_token_html(up)}</code></td><td>{up_v:+.3g}</td>"
                    f"<td><code>{_token_html(down)}</code></td><td>{down_v:+.3g}</td></tr>")  # fmt: skip
    head = "<tr><th>promoted tokens</th><th>logit</th><th>suppressed tokens</th><th>logit</th></tr>"
    return f'<div class="panel"><h3>through the unembedding</h3><table>{head}{"".join(rows)}</table></div>'


def _search_text(f: FeatureDisplay) -> str:
    words = [f"layer {f.layer}", f"{_feature_name(f)} {f.index}", f.explanation or ""]
    words += [t for t, _ in f.promoted_tokens + f.suppressed_tokens]
    words += ["".join(c.tokens) for c in f.max_contexts[:5] + f.min_contexts[:5]]
    return html.escape(" ".join(words).lower(), quote=True)


def _section_html(f: FeatureDisplay) -> str:
    # scale by the peaks, not every window value: a window may include the (never-peak) attention-sink token
    scale = max((abs(c.peak_value) for c in f.max_contexts + f.min_contexts), default=0.0)
    score = "" if f.score is None else f" &middot; {html.escape(f.score_name or 'score')} = {f.score:.4g}"
    interp = "" if f.interp_score is None else f" &middot; autointerp score {f.interp_score:.3g}"
    parts = [
        f'<section class="feature" id="L{f.layer}-F{f.index}" data-layer="{f.layer}" data-kind="{html.escape(f.kind)}" '
        f'data-search="{_search_text(f)}">',
        f"<h2>Layer {f.layer} &middot; {_feature_name(f)} {f.index}{score}{interp}</h2>",
        f'<div class="meta">selection file entry: <code>{html.escape(f.selection_hint)}</code></div>',
    ]
    if f.explanation:
        parts.append(f'<p class="expl"><b>autointerp:</b> {html.escape(f.explanation)}</p>')
    panels = _histogram_panel(f) + _contrast_panel(f) + _tokens_panel(f)
    if panels:
        parts.append(f'<div class="panels">{panels}</div>')
    parts.append('<div class="cols">')
    sides = [(_side_title(f.max_contexts, positive=True), f.max_contexts)]
    if f.min_contexts or f.kind != "latent":
        sides.append((_side_title(f.min_contexts, positive=False), f.min_contexts))
    for title, ctxs in sides:
        body = "".join(_context_html(c, scale) for c in ctxs) or '<div class="meta">no contexts</div>'
        parts.append(f"<div><h3>{title}</h3>{body}</div>")
    parts.append("</div>")
    if f.quantile_contexts:
        rows = "".join(
            f'<div class="qrow"><span class="q">{100 * q:.0f}th pct</span>{_context_html(c, scale)}</div>'
            for q, c in f.quantile_contexts
        )
        parts.append(f"<h3>contexts at quantiles of the per-text peak (a random sample of texts)</h3>{rows}")
    parts.append("</section>")
    return "\n".join(parts)


# Search box and layer filter; "#q=word" in the address prefills the search (a link to a filtered view).
_SCRIPT = """
const q = document.getElementById('q'), layer = document.getElementById('layer');
const count = document.getElementById('count');
function apply() {
  const words = q.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const s of document.querySelectorAll('section.feature')) {
    const ok = (!layer.value || s.dataset.layer === layer.value) && words.every(w => s.dataset.search.includes(w));
    s.style.display = ok ? '' : 'none';
    document.querySelector('tr[data-for="' + s.id + '"]').style.display = ok ? '' : 'none';
    shown += ok;
  }
  count.textContent = shown + ' of ' + document.querySelectorAll('section.feature').length + ' features shown';
}
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get('q')) q.value = hash.get('q');
if (hash.get('layer')) layer.value = hash.get('layer');
q.addEventListener('input', apply); layer.addEventListener('change', apply); apply();
"""


def render_html(features: Sequence[FeatureDisplay], title: str = "CAFT feature displays") -> str:
    """The report as one HTML string (inline CSS, SVG and script, no external references)."""
    rows = "".join(
        f'<tr data-for="L{f.layer}-F{f.index}"><td><a href="#L{f.layer}-F{f.index}">{f.layer}</a></td>'
        f"<td>{_feature_name(f)} {f.index}</td><td>{'' if f.score is None else f'{f.score:.4g}'}</td>"
        f"<td>{'' if f.interp_score is None else f'{f.interp_score:.3g}'}</td>"
        f"<td>{html.escape((f.explanation or '')[:90])}</td>"
        f"<td><code>{html.escape(f.selection_hint)}</code></td></tr>"
        for f in features
    )
    layers = "".join(f'<option value="{layer}">layer {layer}</option>' for layer in sorted({f.layer for f in features}))
    controls = (
        '<div class="controls"><input id="q" type="search" placeholder="search explanations, tokens, contexts" '
        f'size="40"> <select id="layer"><option value="">all layers</option>{layers}</select> '
        '<span id="count" class="meta"></span></div>'
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
        f'<h1>{html.escape(title)}</h1><p class="meta">{legend}</p>\n{controls}\n'
        "<table><tr><th>layer</th><th>feature</th><th>score</th><th>autointerp</th><th>explanation</th>"
        f"<th>selection entry</th></tr>{rows}</table>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n"
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


def with_explanations(features: Sequence[FeatureDisplay], records: Sequence[Mapping]) -> list[FeatureDisplay]:
    """The features with their autointerp records ({"layer", "index", "sign", "explanation", "score"}) attached:
    the explanation of each side ("+: ... / -: ...") and the best side's score."""
    by_feature: dict[tuple[int, int], list[Mapping]] = {}
    for r in records:
        by_feature.setdefault((int(r["layer"]), int(r["index"])), []).append(r)
    out = []
    for f in features:
        sides = by_feature.get((f.layer, f.index), [])
        scores = [float(r["score"]) for r in sides if r.get("score") is not None]
        text = " / ".join(f"{r['sign']}: {r['explanation']}" for r in sides) or None
        out.append(dataclasses.replace(f, explanation=text, interp_score=max(scores) if scores else None))
    return out


def projection_contrast(base: np.ndarray, tuned: np.ndarray, direction: np.ndarray, bins: int = 30) -> dict:
    """Histograms of base and fine-tuned activations [n, d] (the same tokens) projected on one direction [d], over
    shared bin edges: for a PC of fine-tuned minus base activations, how far fine-tuning moved the tokens along it."""
    b = np.asarray(base, np.float64) @ np.asarray(direction, np.float64)
    t = np.asarray(tuned, np.float64) @ np.asarray(direction, np.float64)
    edges = np.histogram_bin_edges(np.concatenate([b, t]), bins=bins)
    return {"edges": [float(e) for e in edges], "base_counts": np.histogram(b, edges)[0].tolist(),
            "tuned_counts": np.histogram(t, edges)[0].tolist(), "base_mean": float(b.mean()),
            "tuned_mean": float(t.mean())}  # fmt: skip


def load_display_json(path: str | os.PathLike) -> list[FeatureDisplay]:
    """Read the features back from a report's JSON (e.g. for autointerp)."""
    path = pathlib.Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return [FeatureDisplay.from_dict(d) for d in payload["features"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a display report JSON ({e}); write one with write_display_report.") from None
