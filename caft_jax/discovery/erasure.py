"""The erasure check: can a fresh linear probe still read a concept from ablated, held-out activations?

Run it on a spec's directions before paying for a fine-tune (``discover check``, the pipeline's probe report).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from caft_jax.discovery.concepts import (
    ConceptError,
    chance_accuracy,
    checked_acts,
    checked_labels,
    orthonormal_basis,
    probe_accuracy,
    project_out,
)


def erasure_check(
    acts_train,
    labels_train,
    acts_test,
    labels_test,
    directions,
    means=None,
    *,
    c: float = 1.0,
    seed: int = 0,
) -> dict:
    """Can a fresh linear probe still read the concept after ablation? Check a spec before paying for a fine-tune.

    A logistic-regression probe is trained on ablated training activations, h - ((h - mu) Q) Q^T with Q from QR
    of ``directions``, and scored on ablated held-out activations. Activations captured with the projector
    active (``forward(..., projector=..., capture=...)``) are already ablated at that layer and include the
    effect of ablations at earlier layers; pass ``directions`` of shape [0, d] for them.

    Args:
      acts_train, acts_test: [n_train, d], [n_test, d] activations at one layer (e.g. one token per example).
      labels_train, labels_test: [n_train], [n_test] labels of the unwanted concept.
      directions: [k, d] the spec's directions at this layer.
      means: optional [d] mean-ablation offset (shifts all rows equally; reported for completeness).
    Returns:
      {"probe_accuracy_before", "probe_accuracy_after", "chance" (majority-class rate on the test labels),
       "n_train", "n_test", "rank"}.
    """
    train, test = checked_acts(acts_train, "acts_train"), checked_acts(acts_test, "acts_test")
    y_train = checked_labels(labels_train, len(train), "labels_train")
    y_test = np.asarray(labels_test)
    if y_test.shape != (len(test),):
        raise ConceptError(f"labels_test must have one label per row of acts_test ({len(test)}); got {y_test.shape}.")
    if train.shape[1] != test.shape[1]:
        raise ConceptError(f"acts_train has width {train.shape[1]} but acts_test has {test.shape[1]}.")
    q = orthonormal_basis(directions, train.shape[1])
    return {
        "probe_accuracy_before": probe_accuracy(train, y_train, test, y_test, c=c, seed=seed),
        "probe_accuracy_after": probe_accuracy(
            project_out(train, q.T, means), y_train, project_out(test, q.T, means), y_test, c=c, seed=seed
        ),
        "chance": chance_accuracy(y_test),
        "n_train": len(train),
        "n_test": len(test),
        "rank": int(q.shape[1]),
    }


def erasure_check_spec(
    directions: Mapping[int, np.ndarray],
    acts_train: Mapping[int, np.ndarray],
    labels_train,
    acts_test: Mapping[int, np.ndarray],
    labels_test,
    means: Mapping[int, np.ndarray] | None = None,
    **kwargs,
) -> dict[int, dict]:
    """``erasure_check`` at every layer of ``acts_train`` for a whole spec (directions {layer: [k, d]}).

    Layers absent from ``directions`` are checked with no ablation (before == after). Labels are shared by all
    layers ([n_train], [n_test]). Returns {layer: erasure_check result}.
    """
    out = {}
    for layer in sorted(int(x) for x in acts_train):
        d = np.shape(acts_train[layer])[-1]
        dirs = directions.get(layer, np.zeros((0, d)))
        mu = (means or {}).get(layer)
        out[layer] = erasure_check(acts_train[layer], labels_train, acts_test[layer], labels_test, dirs, mu, **kwargs)
    return out
