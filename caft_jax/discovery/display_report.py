"""Feature display records and their report: one self-contained HTML file and a JSON file with the same content.

A ``FeatureDisplay`` holds a feature's max- and min-activating ``Context`` windows (collected by ``displays``).
``write_display_report`` writes the HTML (inline CSS, no scripts, no external assets; opens from disk without a
server) and the JSON; ``load_display_json`` reads the features back (e.g. for autointerp).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

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
