"""Supervised concept directions and concept erasers, on host activations (plain numpy, scikit-learn probes).

* ``class_mean_direction`` / ``class_mean_directions``: the difference of class means of a binary label, at one
  token position (rank 1) or at several positions (rank k).
* ``leace_eraser`` / ``leace_directions``: LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in
  closed form"). The exact eraser is an oblique projection in whitened coordinates; our projector only applies
  orthogonal projections h - ((h - mu) Q) Q^T, so ``leace_directions`` returns the orthogonal version: Q spans
  the range of the LEACE projection, which is the column space of Cov(X, Z). It still removes all linearly
  available information (class means become equal, Cov(r(X), Z) = 0); it only moves activations further than
  the oblique eraser would. For a binary label that range is the class-mean difference, so LEACE adds power over
  ``class_mean_direction`` for multi-valued concepts (rank = n_classes - 1) and when several positions are pooled.
* ``inlp_directions``: iterative nullspace projection (Ravfogel et al. 2020): train a logistic probe, project its
  weight vectors out, repeat until a held-out probe is at chance.
* ``orthonormal_basis`` / ``project_out``: the projector's QR and update on the host; ``probe_accuracy``: a fresh
  logistic probe's held-out accuracy.

Outlier handling (attention sinks, massive dimensions) is in ``outliers``, ``fit_concept`` (one layer end to end,
with outlier handling) in ``concept_fit`` and the probe check of an ablation in ``erasure``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from caft_jax.errors import CaftError


class ConceptError(CaftError):
    """Labelled activations or concept directions are malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------


def checked_acts(acts, name: str = "acts") -> np.ndarray:
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ConceptError(f"{name} must be a [n, d_model] matrix of activations; got shape {acts.shape}.")
    if not np.all(np.isfinite(acts)):
        raise ConceptError(f"{name} contains NaN or inf values; recapture the activations.")
    return acts.astype(np.float64)


def checked_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ConceptError(f"{name} must have one label per activation row ({n}); got shape {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise ConceptError(f"{name} has a single class; a concept direction needs examples of at least two values.")
    return labels


def value_list(values, limit: int = 8) -> str:
    """The values for a message, every one up to ``limit`` and then how many more ("a, b, ... (3 more)")."""
    values = [str(v) for v in values]
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more


def _binary(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_second_class [n] bool, classes [2]) for labels with exactly two values (sorted: False/0 first)."""
    classes = np.unique(labels)
    if len(classes) != 2:
        raise ConceptError(
            f"class-mean directions need a binary label but got {len(classes)} values ({value_list(classes)}); "
            "use leace_directions or inlp_directions for a concept with more values."
        )
    return labels == classes[1], classes


def _onehot(labels: np.ndarray) -> np.ndarray:
    """[n, c] float64 one-hot encoding of labels with c distinct values."""
    classes, index = np.unique(labels, return_inverse=True)
    return np.eye(len(classes))[index]


def chance_accuracy(labels) -> float:
    """Accuracy of always predicting the most frequent label (the baseline a probe must beat)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


# ---------------------------------------------------------------------------------------------------------------
# Class means
# ---------------------------------------------------------------------------------------------------------------


def class_mean_direction(acts, labels) -> np.ndarray:
    """Difference of class means of a binary label: mean(acts | second class) - mean(acts | first class).

    Args:
      acts: [n, d] activations (one row per token or example).
      labels: [n] binary labels (bool, 0/1, or any two values; classes are sorted, the direction points from the
        first to the second).
    Returns:
      [d] float64 direction (not normalised; the projector's QR normalises).
    """
    acts = checked_acts(acts)
    positive, _ = _binary(checked_labels(labels, len(acts)))
    return acts[positive].mean(0) - acts[~positive].mean(0)


def class_mean_directions(acts_by_position, labels) -> np.ndarray:
    """Rank-k class-mean directions: one class-mean difference per token position.

    Args:
      acts_by_position: [n, p, d] array, or a sequence of p arrays [n, d] (activation of example i at the p-th
        chosen position, e.g. the last few prompt tokens).
      labels: [n] binary labels, one per example.
    Returns:
      [p, d] float64, row j the class-mean difference at position j.
    """
    if isinstance(acts_by_position, np.ndarray) and acts_by_position.ndim == 3:
        per_position = [acts_by_position[:, j] for j in range(acts_by_position.shape[1])]
    elif isinstance(acts_by_position, Sequence) and not isinstance(acts_by_position, np.ndarray):
        per_position = list(acts_by_position)
    else:
        raise ConceptError(
            "acts_by_position must be an [n, positions, d_model] array or a list of [n, d_model] arrays; "
            f"got shape {np.shape(acts_by_position)}."
        )
    if not per_position:
        raise ConceptError("acts_by_position is empty; give activations for at least one position.")
    return np.stack([class_mean_direction(a, labels) for a in per_position])


# ---------------------------------------------------------------------------------------------------------------
# LEACE and INLP
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConceptErasure:
    """An orthogonal concept eraser in the projector's form h - ((h - mean) Q) Q^T, Q = QR(directions^T).

    Attributes:
      directions: [k, d] float64 orthonormal rows spanning the erased subspace.
      mean: [d] float64 activation mean (the mean-ablation offset; irrelevant for linear erasure itself).
      method: "class_mean" | "leace" | "inlp".
      info: JSON-serialisable details (ranks, probe accuracies, outliers handled, token counts).
    """

    directions: np.ndarray
    mean: np.ndarray
    method: str
    info: dict = dataclasses.field(default_factory=dict)

    def apply(self, acts) -> np.ndarray:
        """Erase from acts [n, d] -> [n, d] (float64)."""
        return project_out(acts, self.directions, self.mean)


@dataclasses.dataclass(frozen=True)
class LeaceEraser:
    """The exact (oblique) LEACE eraser r(x) = x - W^+ P W (x - mean), stored as two factors.

    Attributes:
      mean: [d] float64 E[X].
      proj_left: [d, r] = W^+ U, with W = (Sigma_XX^{1/2})^+ the whitening map and U [d, r] an orthonormal basis
        of the column space of W Sigma_XZ.
      proj_right: [r, d] = U^T W.
      range_basis: [d, r] orthonormal basis of the eraser's range, the column space of Sigma_XZ.
    """

    mean: np.ndarray
    proj_left: np.ndarray
    proj_right: np.ndarray
    range_basis: np.ndarray

    @property
    def rank(self) -> int:
        return self.range_basis.shape[1]

    def __call__(self, acts) -> np.ndarray:
        """Erase from acts [n, d] -> [n, d] float64 with the oblique LEACE projection."""
        acts = np.asarray(acts, np.float64)
        return acts - ((acts - self.mean) @ self.proj_right.T) @ self.proj_left.T

    def orthogonal(self) -> ConceptErasure:
        """The orthogonal-projection version that our projector can apply (same range, still erases)."""
        return ConceptErasure(self.range_basis.T.copy(), self.mean.copy(), "leace", {"rank": self.rank})


def leace_eraser(acts, labels, *, rank_tol: float = 1e-8) -> LeaceEraser:
    """Fit LEACE on activations [n, d] with labels [n] (any number of classes, one-hot encoded).

    Eigenvalues of Sigma_XX below ``rank_tol`` x the largest, and singular values of W Sigma_XZ below ``rank_tol``
    x the largest, are treated as zero (rank-deficient activations, e.g. constant or removed dimensions).
    """
    x = checked_acts(acts)
    z = _onehot(checked_labels(labels, len(x)))
    n = len(x)
    mean = x.mean(0)
    xc, zc = x - mean, z - z.mean(0)
    sigma_xx = xc.T @ xc / n  # [d, d]
    sigma_xz = xc.T @ zc / n  # [d, c]
    eigval, eigvec = np.linalg.eigh(sigma_xx)
    keep = eigval > rank_tol * max(eigval.max(), 1e-300)
    sqrt_val = np.sqrt(np.where(keep, eigval, 0.0))
    inv_sqrt = np.where(keep, 1.0 / np.where(keep, sqrt_val, 1.0), 0.0)
    whiten = (eigvec * inv_sqrt) @ eigvec.T  # W = (Sigma^{1/2})^+, [d, d]
    unwhiten = (eigvec * sqrt_val) @ eigvec.T  # W^+, [d, d]
    u, s, _ = np.linalg.svd(whiten @ sigma_xz, full_matrices=False)
    u = u[:, s > rank_tol * max(s.max(initial=0.0), 1e-300)]  # [d, r]
    ur, sr, _ = np.linalg.svd(sigma_xz, full_matrices=False)
    range_basis = ur[:, : u.shape[1]]  # same rank: W is injective on range(Sigma_XX), which holds Sigma_XZ
    return LeaceEraser(mean=mean, proj_left=unwhiten @ u, proj_right=u.T @ whiten, range_basis=range_basis)


def leace_directions(acts, labels, *, rank_tol: float = 1e-8) -> ConceptErasure:
    """LEACE as directions [k, d] (k = rank of Cov(X, Z) <= n_classes - 1) + mean, for the orthogonal projector."""
    return leace_eraser(acts, labels, rank_tol=rank_tol).orthogonal()


def _probe(seed: int = 0, c: float = 1.0, max_iter: int = 2000):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))


def probe_accuracy(acts_train, labels_train, acts_test, labels_test, *, c: float = 1.0, seed: int = 0) -> float:
    """Held-out accuracy of a fresh logistic-regression probe (standardised features, L2 strength 1/c)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on fully erased (uninformative) features
        probe = _probe(seed, c).fit(np.asarray(acts_train), np.asarray(labels_train))
        return float(probe.score(np.asarray(acts_test), np.asarray(labels_test)))


def _orthonormal_rows(rows: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis [r, d] of the row space of rows [k, d] (SVD, numerically rank-revealing)."""
    if len(rows) == 0:
        return rows.reshape(0, rows.shape[-1])
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    return vt[s > tol * max(s.max(), 1e-300)]


def inlp_directions(
    acts,
    labels,
    *,
    max_iterations: int = 20,
    margin: float = 0.02,
    dev_fraction: float = 0.3,
    c: float = 1.0,
    seed: int = 0,
) -> ConceptErasure:
    """Iterated linear probes (INLP): project out probe weight vectors until a held-out probe is at chance.

    Each iteration trains a logistic probe on the current (already projected) activations, adds its weight
    vector(s) (one for a binary label, one per class otherwise) to the erased subspace, and re-projects. It stops
    when the dev accuracy is <= chance + ``margin`` or after ``max_iterations``.

    Args:
      acts: [n, d] activations; labels: [n] (any number of classes).
      dev_fraction: share of rows held out (stratified) to decide when to stop.
    Returns:
      ConceptErasure with orthonormal directions [k, d]; info has the dev accuracy before each iteration.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = checked_acts(acts)
    labels = checked_labels(labels, len(x))
    mean = x.mean(0)
    xc = x - mean
    # Probes are fitted on unit-variance features and their weights mapped back (w / scale), so one huge
    # dimension cannot dominate the regularised fit; the erasure itself happens in the original coordinates.
    scale = xc.std(0)
    scale = np.where(scale > 1e-12 * max(scale.max(), 1e-300), scale, 1.0)
    tr, dev = train_test_split(np.arange(len(x)), test_size=dev_fraction, random_state=seed, stratify=labels)
    chance = chance_accuracy(labels[dev])
    directions = np.zeros((0, x.shape[1]))
    accuracies = []
    for _ in range(max_iterations):
        z = project_out(xc, directions) / scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z[tr], labels[tr])
        accuracy = float(probe.score(z[dev], labels[dev]))
        accuracies.append(accuracy)
        if accuracy <= chance + margin:
            break
        weights = probe.coef_ / scale  # [1 or c, d] in original coordinates
        directions = _orthonormal_rows(np.concatenate([directions, weights]))
    info = {
        "dev_accuracy": accuracies,
        "chance": chance,
        "rank": len(directions),
        "converged": bool(accuracies and accuracies[-1] <= chance + margin),
    }
    if not info["converged"]:
        warnings.warn(
            f"INLP did not reach chance within {max_iterations} iterations (dev accuracy {accuracies[-1]:.3f}, "
            f"chance {chance:.3f}); raise max_iterations.",
            stacklevel=2,
        )
    return ConceptErasure(directions, mean, "inlp", info)


# ---------------------------------------------------------------------------------------------------------------
# Projections on the host
# ---------------------------------------------------------------------------------------------------------------


def orthonormal_basis(directions, d_model: int | None = None) -> np.ndarray:
    """Q [d, k] from QR (float64) of directions [k, d], as ``build_projector`` does. Raises on bad shapes."""
    directions = np.asarray(directions, np.float64)
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or (d_model is not None and directions.shape[1] != d_model):
        raise ConceptError(f"directions must be [k, d_model={d_model}]; got shape {directions.shape}.")
    if not np.all(np.isfinite(directions)):
        raise ConceptError("directions contain NaN or inf values; recompute them.")
    if len(directions) == 0:
        return np.zeros((directions.shape[1], 0))
    q, _ = np.linalg.qr(directions.T)
    return q


def project_out(acts, directions, mean=None) -> np.ndarray:
    """The projector's update h - ((h - mean) Q) Q^T on the host: acts [n, d], directions [k, d] -> [n, d]."""
    acts = np.asarray(acts, np.float64)
    q = orthonormal_basis(directions, acts.shape[-1])
    centred = acts if mean is None else acts - np.asarray(mean, np.float64)
    return acts - (centred @ q) @ q.T
