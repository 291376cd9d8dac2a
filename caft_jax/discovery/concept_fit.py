"""``fit_concept``: supervised concept directions for one layer from labelled sequences, with outlier handling.

It chains ``outliers`` (detect sinks and massive dimensions, keep sinks out of the statistics, clean the
directions) and the estimators of ``concepts`` (class means, LEACE or INLP), and reports what it did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from caft_jax.discovery.concepts import (
    ConceptErasure,
    ConceptError,
    class_mean_direction,
    inlp_directions,
    leace_directions,
)
from caft_jax.discovery.outliers import (
    OutlierRule,
    clean_directions,
    detect_outliers,
    keep_mask,
    real_positions,
    sequence_mask,
)

METHODS = ("class_mean", "leace", "inlp")


def fit_concept(
    acts_with_positions,
    labels,
    mask=None,
    *,
    method: str = "class_mean",
    positions: Sequence[int] | None = None,
    exclude_sinks: bool = True,
    remove_massive: bool = True,
    rule: OutlierRule = OutlierRule(),  # noqa: B008 - a frozen dataclass, as in detect_outliers
    inlp_kwargs: dict | None = None,
) -> ConceptErasure:
    """Supervised concept directions for one layer from labelled sequences, with outlier handling.

    Args:
      acts_with_positions: [n_seq, t, d] activations of one layer (left- or right-padded).
      labels: [n_seq] label per sequence (broadcast to its tokens) or [n_seq, t] label per token.
      mask: [n_seq, t] bool, the tokens to use (e.g. answer tokens, or all non-pad tokens); default all.
      method: "class_mean" (binary labels), "leace" or "inlp".
      positions: only with "class_mean": token positions counted among each sequence's real tokens (negative
        from the end, -1 = last real token); one class-mean direction per position (rank k). Default: pool all
        masked tokens (rank 1).
      exclude_sinks: drop detected sink tokens from the statistics (no-op when none are detected).
      remove_massive: zero the detected massive dimensions in the activations before fitting and in the
        directions after (so the erasure holds exactly within the remaining coordinates).
      rule: the outlier detection rule.
    Returns:
      ConceptErasure; ``info`` records the method, token count, outliers found and what was done about them.
    """
    if method not in METHODS:
        raise ConceptError(f"unknown concept method {method!r}; use one of {', '.join(METHODS)}.")
    acts = np.asarray(acts_with_positions)
    mask = sequence_mask(acts, mask)
    labels = np.asarray(labels)
    if labels.shape == (acts.shape[0],):
        token_labels = np.broadcast_to(labels[:, None], mask.shape)
    elif labels.shape == mask.shape:
        token_labels = labels
    else:
        raise ConceptError(f"labels must be [n_seq]={acts.shape[0]} or [n_seq, t]={mask.shape}; got {labels.shape}.")
    outliers = detect_outliers(acts, mask, rule=rule)
    use = keep_mask(acts, mask, outliers) if exclude_sinks else mask
    massive = list(outliers.massive_dims) if remove_massive else []

    def cleaned(x):
        x = np.array(x, np.float64)
        x[..., massive] = 0.0
        return x

    if positions is not None:
        if method != "class_mean":
            raise ConceptError("positions are only supported with method='class_mean'.")
        rank = real_positions(mask)
        length = mask.sum(1, keepdims=True)
        per_position = []
        for p in positions:
            target = np.where(p < 0, length + p, p)  # [n_seq, 1]
            hit = (rank == target) & use
            rows = hit.any(1)
            if not rows.any():
                raise ConceptError(f"no sequence has a usable (non-sink) token at position {p}.")
            idx = hit.argmax(1)
            per_position.append(
                (
                    cleaned(acts[np.flatnonzero(rows), idx[rows]]),
                    labels[rows] if labels.ndim == 1 else token_labels[np.flatnonzero(rows), idx[rows]],
                )
            )
        directions = np.stack([class_mean_direction(a, y) for a, y in per_position])
        x = np.concatenate([a for a, _ in per_position])
        n_tokens = len(x)
        erasure = ConceptErasure(directions, x.mean(0), "class_mean", {"positions": list(positions)})
    else:
        x, y = cleaned(acts[use]), token_labels[use]
        n_tokens = len(x)
        if method == "class_mean":
            erasure = ConceptErasure(class_mean_direction(x, y)[None], x.mean(0), "class_mean", {})
        elif method == "leace":
            erasure = leace_directions(x, y)
        else:
            erasure = inlp_directions(x, y, **(inlp_kwargs or {}))
    directions = clean_directions(erasure.directions, massive) if massive else erasure.directions
    info = dict(erasure.info)
    info.update(
        method=method,
        n_tokens=int(n_tokens),
        rank=int(len(directions)),
        outliers=outliers.to_metadata(),
        excluded_sinks=bool(exclude_sinks and outliers.n_sink_tokens > 0),
        removed_massive_dims=list(massive),
        outlier_rule=dataclasses.asdict(rule),
    )
    return ConceptErasure(directions, erasure.mean, method, info)
