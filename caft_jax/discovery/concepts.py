"""Supervised concept directions, concept erasers, the model's outliers, and the erasure check.

Everything here is plain numpy (and scikit-learn for probes) on host activations:

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
* ``detect_outliers`` / ``clean_directions`` / ``keep_mask``: attention-sink tokens and massive dimensions.
  Ablating raw directions that contain the huge sink / massive-dimension components rewrites them and breaks the
  model (measured on SmolLM2-135M), so sinks are excluded from statistics and massive dimensions are projected
  out of every direction before QR.
* ``erasure_check``: accuracy of a fresh linear probe on ablated, held-out activations.

``fit_concept`` chains these for one layer, with outlier handling on by default, and reports what it did.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from caft_jax.errors import CaftError

METHODS = ("class_mean", "leace", "inlp")


class ConceptError(CaftError):
    """Labelled activations or concept directions are malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------


def _as_acts(acts, name: str = "acts") -> np.ndarray:
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ConceptError(f"{name} must be a [n, d_model] matrix of activations; got shape {acts.shape}.")
    if not np.all(np.isfinite(acts)):
        raise ConceptError(f"{name} contains NaN or inf values; recapture the activations.")
    return acts.astype(np.float64)


def _as_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ConceptError(f"{name} must have one label per activation row ({n}); got shape {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise ConceptError(f"{name} has a single class; a concept direction needs examples of at least two values.")
    return labels


def _binary(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_second_class [n] bool, classes [2]) for labels with exactly two values (sorted: False/0 first)."""
    classes = np.unique(labels)
    if len(classes) != 2:
        raise ConceptError(
            f"class-mean directions need a binary label but got {len(classes)} values {classes.tolist()[:5]}; "
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
    acts = _as_acts(acts)
    positive, _ = _binary(_as_labels(labels, len(acts)))
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
    x = _as_acts(acts)
    z = _onehot(_as_labels(labels, len(x)))
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

    x = _as_acts(acts)
    labels = _as_labels(labels, len(x))
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
# Projections and the erasure check
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
    train, test = _as_acts(acts_train, "acts_train"), _as_acts(acts_test, "acts_test")
    y_train = _as_labels(labels_train, len(train), "labels_train")
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


# ---------------------------------------------------------------------------------------------------------------
# Outliers: attention sinks and massive dimensions
# ---------------------------------------------------------------------------------------------------------------


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


def _seq_mask(acts: np.ndarray, mask) -> np.ndarray:
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
    mask = _seq_mask(acts, mask)
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
    mask = _seq_mask(acts, mask)
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


# ---------------------------------------------------------------------------------------------------------------
# One layer, end to end
# ---------------------------------------------------------------------------------------------------------------


def fit_concept(
    acts_with_positions,
    labels,
    mask=None,
    *,
    method: str = "class_mean",
    positions: Sequence[int] | None = None,
    exclude_sinks: bool = True,
    remove_massive: bool = True,
    rule: OutlierRule = OutlierRule(),
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
    mask = _seq_mask(acts, mask)
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
