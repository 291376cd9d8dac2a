"""The model's outliers in activations of one layer: attention-sink tokens and massive dimensions.

Ablating raw directions that contain the huge sink / massive-dimension components rewrites them and breaks the
model (measured on SmolLM2-135M), so sinks are excluded from statistics (``keep_mask``) and massive dimensions are
projected out of every direction before QR (``clean_directions``). Plain numpy on host activations.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from caft_jax.discovery.concepts import ConceptError


@dataclasses.dataclass(frozen=True)
class OutlierRule:
    """Detection rule for the model's outliers (thresholds are relative, so they hold across model sizes).

    Attributes:
      sink_factor: a token is a sink when its norm > sink_factor x the median token norm.
      sink_min_fraction: a position (counted from each sequence's first real token) is reported as a sink
        position when at least this fraction of the sequences long enough to have it have a sink there.
      massive_factor: a dimension is massive when its median |value| over non-sink tokens > massive_factor x the
        median of that statistic over all dimensions.
    """

    sink_factor: float = 10.0
    sink_min_fraction: float = 0.5
    massive_factor: float = 10.0


@dataclasses.dataclass(frozen=True)
class Outliers:
    """Detected outliers of one layer.

    Attributes:
      sink_positions: positions counted from each sequence's first real token (0 = first token) that are sinks.
      massive_dims: indices of massive dimensions of d_model.
      thresholds: {"sink_norm": norm above which a token is a sink, "massive_value": median |value| above which
        a dimension is massive, "median_token_norm", "median_dim_value"}.
      n_sink_tokens: number of individual tokens whose norm exceeded the sink threshold.
    """

    sink_positions: tuple[int, ...]
    massive_dims: tuple[int, ...]
    thresholds: dict
    n_sink_tokens: int = 0

    def to_metadata(self) -> dict:
        return {
            "sink_positions": list(self.sink_positions),
            "massive_dims": list(self.massive_dims),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "n_sink_tokens": int(self.n_sink_tokens),
        }


def sequence_mask(acts: np.ndarray, mask) -> np.ndarray:
    if acts.ndim != 3:
        raise ConceptError(f"activations with positions must be [n_seq, t, d_model]; got shape {acts.shape}.")
    if mask is None:
        return np.ones(acts.shape[:2], bool)
    mask = np.asarray(mask, bool)
    if mask.shape != acts.shape[:2]:
        raise ConceptError(f"mask must be [n_seq, t] = {acts.shape[:2]} like the activations; got {mask.shape}.")
    return mask


def real_positions(mask) -> np.ndarray:
    """[n_seq, t] int: index of each token among its sequence's real tokens (left padding gets -1)."""
    mask = np.asarray(mask, bool)
    return np.where(mask, np.cumsum(mask, axis=1) - 1, -1)


def detect_outliers(acts_with_positions, mask=None, *, rule: OutlierRule = OutlierRule()) -> Outliers:
    """Find attention-sink positions and massive dimensions in activations of one layer.

    Args:
      acts_with_positions: [n_seq, t, d] activations (e.g. ``captured[i]`` of a left-padded batch).
      mask: [n_seq, t] bool, True on real tokens (default: all). Padding is ignored.
      rule: thresholds of the detection rule.
    Returns:
      Outliers (positions are counted from each sequence's first real token, so left padding does not matter).
    """
    acts = np.asarray(acts_with_positions)
    mask = sequence_mask(acts, mask)
    if not mask.any():
        raise ConceptError("the mask selects no tokens; there is nothing to detect outliers in.")
    norms = np.linalg.norm(acts.astype(np.float64), axis=-1)  # [n_seq, t]
    median_norm = float(np.median(norms[mask]))
    sink_norm = rule.sink_factor * median_norm
    is_sink = mask & (norms > sink_norm)  # [n_seq, t]
    pos = real_positions(mask)
    sink_positions = []
    for p in np.unique(pos[is_sink]):
        at_p = pos == p
        if is_sink[at_p].mean() >= rule.sink_min_fraction:
            sink_positions.append(int(p))
    kept = mask & ~is_sink
    values = np.abs(acts[kept] if kept.any() else acts[mask]).astype(np.float64)  # [n_tokens, d]
    dim_median = np.median(values, axis=0)  # [d]
    median_dim = float(np.median(dim_median))
    massive_value = rule.massive_factor * median_dim
    massive = np.flatnonzero(dim_median > massive_value)
    thresholds = {
        "sink_norm": sink_norm,
        "massive_value": massive_value,
        "median_token_norm": median_norm,
        "median_dim_value": median_dim,
    }
    return Outliers(tuple(sink_positions), tuple(int(i) for i in massive), thresholds, int(is_sink.sum()))


def keep_mask(acts_with_positions, mask, outliers: Outliers) -> np.ndarray:
    """[n_seq, t] bool: real tokens that are not sinks (not at a sink position, norm under the sink threshold).

    Use it to select tokens for PCA, class means and probes, so sinks do not enter the statistics.
    """
    acts = np.asarray(acts_with_positions)
    mask = sequence_mask(acts, mask)
    norms = np.linalg.norm(acts.astype(np.float64), axis=-1)
    at_sink_position = np.isin(real_positions(mask), list(outliers.sink_positions))
    return mask & ~at_sink_position & (norms <= outliers.thresholds["sink_norm"])


def clean_directions(directions, massive_dims: Sequence[int], *, min_norm_ratio: float = 1e-3) -> np.ndarray:
    """Project the massive coordinates out of each direction (set them to 0), before the projector's QR.

    Args:
      directions: [k, d] (or [d]) raw directions.
      massive_dims: indices to remove.
      min_norm_ratio: a direction keeping less than this fraction of its norm lived in the massive dimensions;
        it is dropped (with a warning) rather than left as numerical noise that QR would blow up.
    Returns:
      [k', d] float64 directions with zeros at ``massive_dims`` (k' <= k).
    """
    directions = np.array(directions, np.float64, ndmin=2)
    if directions.ndim != 2:
        raise ConceptError(f"directions must be [k, d_model]; got shape {directions.shape}.")
    dims = np.asarray(list(massive_dims), int)
    if dims.size and (dims.min() < 0 or dims.max() >= directions.shape[1]):
        raise ConceptError(f"massive_dims {dims.tolist()} are out of range for d_model={directions.shape[1]}.")
    before = np.linalg.norm(directions, axis=1)
    directions[:, dims] = 0.0
    after = np.linalg.norm(directions, axis=1)
    keep = after > min_norm_ratio * np.maximum(before, 1e-300)
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} direction(s) lay almost entirely in the massive dimensions "
            f"{dims.tolist()} and were dropped.",
            stacklevel=2,
        )
    return directions[keep]
