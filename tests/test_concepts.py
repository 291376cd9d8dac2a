"""Supervised concept directions, LEACE / INLP erasure, outlier handling and the erasure check, on planted data."""

from __future__ import annotations

import numpy as np
import pytest

from caft_jax.discovery.concept_fit import fit_concept
from caft_jax.discovery.concepts import (
    ConceptError,
    class_mean_direction,
    class_mean_directions,
    inlp_directions,
    leace_directions,
    leace_eraser,
    project_out,
)
from caft_jax.discovery.erasure import erasure_check, erasure_check_spec
from caft_jax.discovery.outliers import OutlierRule, clean_directions, detect_outliers, keep_mask

D = 24


def unit_rows(k: int, d: int = D, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return q.T  # [k, d] orthonormal


def cos(a, b) -> float:
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_class_mean_recovers_planted_direction():
    rng = np.random.default_rng(1)
    u = unit_rows(1)[0]
    y = rng.integers(0, 2, 4000)
    acts = rng.normal(size=(4000, D)) + 5.0 + np.where(y[:, None] == 1, 1.5, -1.5) * u
    direction = class_mean_direction(acts, y)
    assert cos(direction, u) > 0.98
    assert direction @ u > 0  # points from the first class to the second
    np.testing.assert_allclose(direction, acts[y == 1].mean(0) - acts[y == 0].mean(0))
    # string labels work too (sorted: "he" < "she")
    assert cos(class_mean_direction(acts, np.where(y == 1, "she", "he")), u) > 0.98
    with pytest.raises(ConceptError, match="binary"):
        class_mean_direction(acts, y + (np.arange(4000) % 3 == 0))
    with pytest.raises(ConceptError, match="one label per"):
        class_mean_direction(acts, y[:-1])
    # the message's count and its list agree: every value up to eight, then how many more
    with pytest.raises(ConceptError, match=r"got 10 values \(0, 1, 2, 3, 4, 5, 6, 7, \.\.\. \(2 more\)\)"):
        class_mean_direction(acts, np.arange(4000) % 10)


def test_class_mean_directions_one_per_position():
    rng = np.random.default_rng(2)
    u = unit_rows(2, seed=3)
    y = rng.integers(0, 2, 3000)
    acts = rng.normal(size=(3000, 2, D))
    acts[:, 0] += 2.0 * y[:, None] * u[0]  # position 0 carries the concept along u0, position 1 along u1
    acts[:, 1] += 2.0 * y[:, None] * u[1]
    directions = class_mean_directions(acts, y)
    assert directions.shape == (2, D)
    assert cos(directions[0], u[0]) > 0.97 and cos(directions[1], u[1]) > 0.97
    as_list = class_mean_directions([acts[:, 0], acts[:, 1]], y)
    np.testing.assert_allclose(as_list, directions)


def three_valued_concept(n: int, seed: int = 0):
    """A concept with three values encoded in two directions (class means on a triangle); 0/1 vs 2 differ."""
    rng = np.random.default_rng(seed)
    u = unit_rows(2, seed=seed + 10)
    y = rng.integers(0, 3, n)
    centres = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    mix = np.linalg.qr(rng.normal(size=(D, D)))[0] * np.linspace(0.5, 2.0, D)  # correlated, anisotropic noise
    acts = rng.normal(size=(n, D)) @ mix.T + centres[y] @ u + 3.0
    return acts, y, u


def test_leace_and_inlp_erase_what_a_rank1_class_mean_leaves():
    acts, y, _ = three_valued_concept(3000)
    tr, te = slice(0, 2000), slice(2000, None)
    # A rank-1 class-mean direction (values 0 vs 1) leaves the third value linearly readable.
    pair = y[tr] < 2
    rank1 = class_mean_direction(acts[tr][pair], y[tr][pair])[None]
    check1 = erasure_check(acts[tr], y[tr], acts[te], y[te], rank1)
    assert check1["probe_accuracy_before"] > 0.6
    assert check1["probe_accuracy_after"] > check1["chance"] + 0.15, check1

    leace = leace_directions(acts[tr], y[tr])
    assert leace.directions.shape == (2, D)  # rank = n_classes - 1
    np.testing.assert_allclose(leace.directions @ leace.directions.T, np.eye(2), atol=1e-10)
    check_l = erasure_check(acts[tr], y[tr], acts[te], y[te], leace.directions, leace.mean)
    assert check_l["probe_accuracy_after"] <= check_l["chance"] + 0.05, check_l
    assert check_l["probe_accuracy_before"] == check1["probe_accuracy_before"]

    # the orthogonal version equalises the class means exactly on the fitting data (Cov(r(X), Z) = 0)
    erased = leace.apply(acts[tr])
    means = np.stack([erased[y[tr] == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(means - means[0], 0.0, atol=1e-9)

    # the exact (oblique) LEACE eraser: same guarantee, smaller edit than the orthogonal projection
    eraser = leace_eraser(acts[tr], y[tr])
    oblique = eraser(acts[tr])
    means = np.stack([oblique[y[tr] == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(means - means[0], 0.0, atol=1e-9)
    assert np.mean((oblique - acts[tr]) ** 2) < np.mean((erased - acts[tr]) ** 2)

    inlp = inlp_directions(acts[tr], y[tr])
    assert inlp.info["converged"] and 2 <= len(inlp.directions) <= 12
    check_i = erasure_check(acts[tr], y[tr], acts[te], y[te], inlp.directions)
    assert check_i["probe_accuracy_after"] <= check_i["chance"] + 0.05, check_i


def test_leace_of_a_binary_label_spans_the_class_mean_difference():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 2000)
    acts = rng.normal(size=(2000, D)) @ rng.normal(size=(D, D)) + 2.0 * y[:, None] * unit_rows(1)[0]
    leace = leace_directions(acts, y)
    assert leace.directions.shape == (1, D)
    assert cos(leace.directions[0], class_mean_direction(acts, y)) > 1 - 1e-9


def test_erasure_check_numbers():
    rng = np.random.default_rng(3)
    u, v = unit_rows(2, seed=4)
    y = (rng.random(2600) < 0.7).astype(int)  # unbalanced: chance is the majority rate, about 0.7
    acts = rng.normal(size=(2600, D)) + 4.0 * y[:, None] * u
    tr, te = slice(0, 2000), slice(2000, None)
    result = erasure_check(acts[tr], y[tr], acts[te], y[te], u[None])
    assert set(result) == {"probe_accuracy_before", "probe_accuracy_after", "chance", "n_train", "n_test", "rank"}
    assert result["chance"] == pytest.approx(max(np.mean(y[te]), 1 - np.mean(y[te])))
    assert result["probe_accuracy_before"] > 0.97
    assert result["probe_accuracy_after"] <= result["chance"] + 0.03
    assert (result["n_train"], result["n_test"], result["rank"]) == (2000, 600, 1)
    # an unrelated direction leaves the concept readable; a mean offset does not change linear readability
    other = erasure_check(acts[tr], y[tr], acts[te], y[te], v[None], means=np.full(D, 3.0))
    assert other["probe_accuracy_after"] > 0.97
    # non-unit, non-orthogonal directions are orthonormalised by QR, as in build_projector
    skew = erasure_check(acts[tr], y[tr], acts[te], y[te], np.stack([3 * u + v, v]))
    assert skew["rank"] == 2 and skew["probe_accuracy_after"] <= skew["chance"] + 0.03
    with pytest.raises(ConceptError, match="d_model"):
        erasure_check(acts[tr], y[tr], acts[te], y[te], np.ones((1, D + 1)))
    np.testing.assert_allclose(project_out(acts[:5], u[None]) @ u, 0.0, atol=1e-12)
    # a whole spec: layer 3 ablated, layer 4 not in the spec (rank 0, unchanged)
    spec = erasure_check_spec({3: u[None]}, {3: acts[tr], 4: acts[tr]}, y[tr], {3: acts[te], 4: acts[te]}, y[te])
    assert spec[3] == result and spec[4]["rank"] == 0
    assert spec[4]["probe_accuracy_after"] == spec[4]["probe_accuracy_before"]


def outlier_data(seed: int = 0):
    """Left-padded sequences with an attention sink at each first real token and a massive dimension 5."""
    rng = np.random.default_rng(seed)
    n_seq, t = 200, 12
    u = unit_rows(1, seed=7)[0]
    u[5] = 0.0
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, n_seq)
    lengths = rng.integers(4, t + 1, n_seq)
    mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
    acts = rng.normal(size=(n_seq, t, D)) + 1.5 * y[:, None, None] * u
    acts[..., 5] = 60.0 + 4.0 * y[:, None] + rng.normal(size=(n_seq, t))  # massive, and shifts with the label
    first = mask & (np.cumsum(mask, axis=1) == 1)
    sink = rng.normal(size=(n_seq, D)) * 300.0  # huge, label-independent noise on the sink token
    acts[first] = sink
    acts[~mask] = 0.0
    return acts, mask, y, u


def test_outliers_detected_and_cleaned():
    acts, mask, y, u = outlier_data()
    outliers = detect_outliers(acts, mask)
    assert outliers.sink_positions == (0,)
    assert outliers.massive_dims == (5,)
    assert outliers.n_sink_tokens == len(acts)
    meta = outliers.to_metadata()
    assert meta["sink_positions"] == [0] and meta["massive_dims"] == [5] and meta["thresholds"]["sink_norm"] > 0

    keep = keep_mask(acts, mask, outliers)
    first = mask & (np.cumsum(mask, axis=1) == 1)
    np.testing.assert_array_equal(keep, mask & ~first)

    raw = np.stack([u + 0.1, np.eye(D)[5] * 3.0 + 1e-6, u])
    with pytest.warns(UserWarning, match="massive"):
        cleaned = clean_directions(raw, outliers.massive_dims)
    assert cleaned.shape == (2, D)  # the direction living in dim 5 is dropped
    np.testing.assert_array_equal(cleaned[:, 5], 0.0)
    np.testing.assert_allclose(cleaned[1], u)

    # stricter rules find nothing on the same data; plain Gaussian activations have no outliers
    none = detect_outliers(acts, mask, rule=OutlierRule(sink_factor=1e6, massive_factor=1e6))
    assert none.sink_positions == () and none.massive_dims == ()
    plain = detect_outliers(np.random.default_rng(0).normal(size=(50, 8, D)))
    assert plain.sink_positions == () and plain.massive_dims == ()


def test_fit_concept_handles_outliers_by_default_and_reports_them():
    acts, mask, y, u = outlier_data(seed=1)
    fitted = fit_concept(acts, y, mask)
    assert fitted.directions.shape == (1, D)
    assert fitted.directions[0, 5] == 0.0
    assert cos(fitted.directions[0], u) > 0.95
    info = fitted.info
    assert info["excluded_sinks"] and info["removed_massive_dims"] == [5]
    assert info["outliers"]["sink_positions"] == [0] and info["n_tokens"] == int(mask.sum() - len(acts))

    with_sinks = fit_concept(acts, y, mask, exclude_sinks=False)  # the sinks' huge noise swamps the class means
    assert cos(with_sinks.directions[0], u) < 0.7 and not with_sinks.info["excluded_sinks"]
    with_massive = fit_concept(acts, y, mask, remove_massive=False)  # the label-shifted massive dim dominates
    assert abs(with_massive.directions[0, 5]) > 0.5 * np.linalg.norm(with_massive.directions[0])
    assert with_massive.info["removed_massive_dims"] == []

    # rank-k over positions counted among real tokens (negative = from the end)
    by_pos = fit_concept(acts, y, mask, positions=[1, -1])
    assert by_pos.directions.shape == (2, D) and np.all(by_pos.directions[:, 5] == 0.0)
    assert by_pos.info["positions"] == [1, -1]

    for method in ("leace", "inlp"):
        erasure = fit_concept(acts, y, mask, method=method)
        assert np.all(erasure.directions[:, 5] == 0.0) and erasure.info["method"] == method
        keep = keep_mask(acts, mask, detect_outliers(acts, mask))
        x = acts[keep]
        x[:, 5] = 0.0
        labels = np.broadcast_to(y[:, None], mask.shape)[keep]
        half = len(x) // 2
        check = erasure_check(x[:half], labels[:half], x[half:], labels[half:], erasure.directions)
        assert check["probe_accuracy_after"] <= check["chance"] + 0.05, (method, check)
    with pytest.raises(ConceptError, match="unknown concept method"):
        fit_concept(acts, y, mask, method="pca")
