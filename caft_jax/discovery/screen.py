"""Data screening by a concept direction: score every training record by how far its response reads along the
direction, rank the records, and optionally drop the top fraction before training.

A record's score is the mean over its response tokens (the trained tokens, ``loss_mask``) of h . q, with h the
residual stream at the direction's layer and q the direction (unit length): the records that express the concept
most. Used with persona vectors' data filtering, or to check what a CAFT direction picks up in the training set.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from caft_jax.discovery.capture import capture_step, positions_mask
from caft_jax.errors import ConfigError
from caft_jax.jsonio import write_jsonl
from caft_jax.model.transformer import Capture, Model

OUTPUTS = ("screening.jsonl", "screening.png", "kept.jsonl", "dropped.jsonl")


def projection_scores(
    model: Model,
    batches: Iterable[dict],
    layer: int,
    direction: np.ndarray,
    *,
    site: str = "resid_post",
    lora: dict | None = None,
    lora_settings=None,
) -> np.ndarray:
    """Mean h . q over each record's response tokens, float64 [n_records] in batch order (NaN: no response token).

    Args:
      batches: unshuffled batch dicts (``data.make_batches(..., shuffle=False)``); filler rows are skipped.
      direction: [d_model], normalised here.
    """
    direction = np.asarray(direction, np.float64)
    norm = np.linalg.norm(direction)
    if direction.shape != (model.spec.d_model,) or not np.isfinite(norm) or norm == 0:
        raise ConfigError(f"the screening direction must be a non-zero vector of width {model.spec.d_model}.")
    q = jnp.asarray(direction / norm, jnp.float32)
    capture = Capture((int(layer),), site, jnp.float32)
    scores = []
    for batch in batches:
        keep = positions_mask(batch, "answer")  # [b, t]
        tokens, attn = jnp.asarray(batch["tokens"], jnp.int32), jnp.asarray(batch["attn_mask"], bool)
        acts = capture_step(model, tokens, attn, lora, lora_settings, None, capture)[0]  # [b, t, d]
        along = np.asarray(acts @ q, np.float64)  # [b, t]
        valid = np.asarray(batch.get("row_valid", np.ones(len(keep), bool)), bool)
        for row in np.flatnonzero(valid):
            n = keep[row].sum()
            scores.append(float(along[row][keep[row]].sum() / n) if n else math.nan)
    return np.asarray(scores, np.float64)


def split_top(scores: np.ndarray, drop_top: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices, dropped indices), both in file order: the ceil(drop_top * n) highest scores are dropped
    (records without a score are kept)."""
    if not 0 <= drop_top < 1:
        raise ConfigError(f"--drop-top must be a fraction in [0, 1); got {drop_top}.")
    n_drop = math.ceil(drop_top * len(scores))
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    dropped = np.sort(order[:n_drop])
    kept = np.setdiff1d(np.arange(len(scores)), dropped)
    return kept, dropped


def write_screening(
    out_dir: pathlib.Path, records: Sequence[dict], scores: np.ndarray, *, drop_top: float, title: str
) -> dict[str, pathlib.Path]:
    """screening.jsonl (records ranked by score), screening.png (histogram, the dropped tail marked) and, with
    ``drop_top``, kept.jsonl / dropped.jsonl (the records themselves, file order)."""
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} records but {len(scores)} scores")
    kept, dropped = split_top(scores, drop_top)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    is_dropped = set(dropped.tolist())
    paths = {"ranking": out_dir / "screening.jsonl", "plot": out_dir / "screening.png"}
    write_jsonl(
        paths["ranking"],
        [
            {"rank": rank, "index": int(i), "score": None if math.isnan(scores[i]) else float(scores[i]),
             "dropped": int(i) in is_dropped, "record": records[i]}
            for rank, i in enumerate(order, start=1)
        ],
    )  # fmt: skip
    _histogram(paths["plot"], scores, scores[dropped] if len(dropped) else None, title)
    if drop_top:
        paths["kept"], paths["dropped"] = out_dir / "kept.jsonl", out_dir / "dropped.jsonl"
        write_jsonl(paths["kept"], [records[i] for i in kept])
        write_jsonl(paths["dropped"], [records[i] for i in dropped])
    return paths


def _histogram(path: pathlib.Path, scores: np.ndarray, dropped: np.ndarray | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    finite = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(finite, bins=min(40, max(5, len(finite) // 5))) if len(finite) else 10
    ax.hist(finite, bins=bins, color="#4a78b0", label=f"{len(finite)} records")
    if dropped is not None and len(dropped):
        ax.hist(dropped[np.isfinite(dropped)], bins=bins, color="#c0504d", label=f"dropped: top {len(dropped)}")
    ax.set_xlabel("mean projection on the direction over response tokens")
    ax.set_ylabel("records")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
