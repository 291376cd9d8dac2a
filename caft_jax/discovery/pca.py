"""PCA of activation differences (caft_method.md sections 2.1 and 2.2), exact or streaming, and its file format.

Both back-ends compute plain centred PCA (no standardisation, no whitening) in float64 and return the same thing:

* ``pca_exact``: SVD of the centred [n, d] matrix; for token counts that fit in memory.
* ``StreamingPCA``: accumulates sum x and sum x x^T in float64 batch by batch (constant memory in the number of
  tokens), then ``eigh`` of the covariance; for millions of tokens.

Conventions shared by both: components are rows [k, d] sorted by explained variance, descending; explained variance
is the covariance eigenvalue S^2 / (n - 1); the ratio divides by the total variance (the covariance trace); each
component's sign is fixed so that its entry of largest magnitude is positive (a PC's sign is arbitrary otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from caft_jax.errors import CheckpointError, DataError

METADATA_KEYS = ("model", "adapter", "layers", "data", "token_count", "mask", "site")


@dataclasses.dataclass(frozen=True)
class PCAResult:
    """Principal components of one layer's activations (or activation differences).

    Attributes:
      components: [k, d] float32, orthonormal rows, by explained variance descending.
      explained_variance: [k] float64, variance along each component (S^2 / (n - 1)).
      explained_variance_ratio: [k] float64, explained_variance / total variance.
      mean: [d] float64, the mean removed before the decomposition.
      n_tokens: number of rows (tokens) the PCA was fitted on.
    """

    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray
    n_tokens: int


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Flip each row of ``components`` [k, d] so that its entry of largest magnitude is positive. [k, d]."""
    components = np.asarray(components)
    if components.size == 0:
        return components
    peak = components[np.arange(components.shape[0]), np.argmax(np.abs(components), axis=1)]
    return components * np.where(peak < 0, -1.0, 1.0).astype(components.dtype)[:, None]


def _check_matrix(X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"PCA needs a [n_tokens, d] matrix, got an array of shape {X.shape}.")
    if not np.all(np.isfinite(X)):
        raise DataError("the activations passed to PCA contain NaN or inf; check the model and data that made them.")
    return X


def _n_keep(n_components: int, n: int, d: int) -> int:
    if n < 2:
        raise DataError(f"PCA needs at least 2 tokens, got {n}; capture more data or use a wider token mask.")
    if n_components < 1:
        raise DataError(f"n_components must be at least 1, got {n_components}.")
    return min(int(n_components), d, n)


def pca_exact(X, n_components: int = 20) -> PCAResult:
    """Exact centred PCA of ``X`` [n, d] by float64 SVD.

    Returns a PCAResult with min(n_components, n, d) components (see the module docstring for conventions).
    """
    X = _check_matrix(X)
    n, d = X.shape
    k = _n_keep(n_components, n, d)
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = X.astype(np.float64) - mean
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    variance = s**2 / (n - 1)
    total = variance.sum()
    ratio = variance[:k] / total if total > 0 else np.zeros(k)
    return PCAResult(
        components=fix_signs(vt[:k]).astype(np.float32),
        explained_variance=variance[:k],
        explained_variance_ratio=ratio,
        mean=mean,
        n_tokens=n,
    )


class StreamingPCA:
    """Centred PCA accumulated over chunks of rows: ``update`` any number of times, then ``finalize``.

    Accumulates, in float64, the sum and the sum of outer products of ``x - shift``, where ``shift`` is the mean of
    the first chunk (this keeps the covariance accurate when activations have a large common offset, like the
    massive dimensions of some models). Memory is O(d^2), independent of the token count.
    """

    def __init__(self, d: int):
        self.d = int(d)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(self.d, np.float64)
        self.sum_sq = np.zeros((self.d, self.d), np.float64)

    def update(self, X) -> StreamingPCA:
        """Add the rows of ``X`` [n, d] (any float dtype). Returns self."""
        X = _check_matrix(X)
        if X.shape[1] != self.d:
            raise DataError(f"StreamingPCA was built for d={self.d} but got rows of width {X.shape[1]}.")
        if X.shape[0] == 0:
            return self
        X = X.astype(np.float64)
        if self.shift is None:
            self.shift = X.mean(axis=0)
        X = X - self.shift
        self.n += X.shape[0]
        self.sum += X.sum(axis=0)
        self.sum_sq += X.T @ X
        return self

    def finalize(self, n_components: int = 20) -> PCAResult:
        """The PCA of all rows seen so far, by ``eigh`` of the (n - 1)-normalised covariance. PCAResult."""
        k = _n_keep(n_components, self.n, self.d)
        mu = self.sum / self.n
        cov = (self.sum_sq - self.n * np.outer(mu, mu)) / (self.n - 1)
        cov = (cov + cov.T) / 2
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
        total = max(float(np.trace(cov)), 0.0)
        ratio = evals[:k] / total if total > 0 else np.zeros(k)
        return PCAResult(
            components=fix_signs(evecs[:, :k].T).astype(np.float32),
            explained_variance=evals[:k],
            explained_variance_ratio=ratio,
            mean=self.shift + mu,
            n_tokens=self.n,
        )


def pca_layers(X_by_layer: dict[int, np.ndarray], n_components: int = 20) -> dict[int, PCAResult]:
    """``pca_exact`` of every layer's [n, d] matrix: {layer: PCAResult}."""
    return {int(layer): pca_exact(X, n_components) for layer, X in X_by_layer.items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def save_pca(path: str | os.PathLike, results: dict[int, PCAResult], metadata: dict | None = None) -> pathlib.Path:
    """Write {layer: PCAResult} to one ``.safetensors`` (default) or ``.npz`` file with JSON metadata.

    Tensors: ``components.{l}`` [k, d] float32, ``explained_variance.{l}`` [k], ``explained_variance_ratio.{l}`` [k],
    ``mean.{l}`` [d] (float64). ``metadata`` should name model, adapter, layers, data, token_count, mask and site
    (``METADATA_KEYS``); missing keys are filled from the results where possible. Per-layer token counts are added
    under ``n_tokens``. Returns the path.
    """
    path = pathlib.Path(path)
    meta = {key: None for key in METADATA_KEYS}
    meta.update(_jsonable(dict(metadata or {})))
    if meta["layers"] is None:
        meta["layers"] = sorted(int(k) for k in results)
    n_tokens = {str(int(k)): int(r.n_tokens) for k, r in results.items()}
    if meta["token_count"] is None and n_tokens:
        meta["token_count"] = max(n_tokens.values())
    meta["n_tokens"] = n_tokens
    tensors = {}
    for layer, r in results.items():
        layer = int(layer)
        tensors[f"components.{layer}"] = np.ascontiguousarray(r.components, np.float32)
        tensors[f"explained_variance.{layer}"] = np.ascontiguousarray(r.explained_variance, np.float64)
        tensors[f"explained_variance_ratio.{layer}"] = np.ascontiguousarray(r.explained_variance_ratio, np.float64)
        tensors[f"mean.{layer}"] = np.ascontiguousarray(r.mean, np.float64)
    text = json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, __metadata__=np.asarray(text), **tensors)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata={"caft_jax_pca": text})
    return path


def load_pca(path: str | os.PathLike) -> tuple[dict[int, PCAResult], dict]:
    """Read ``(results {layer: PCAResult}, metadata dict)`` from a file written by ``save_pca``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"PCA file {path} does not exist; create it with `python -m caft_jax.discover pca`.")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                tensors = {k: data[k] for k in data.files}
            text = str(tensors.pop("__metadata__"))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                text = (f.metadata() or {})["caft_jax_pca"]
        meta = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any read failure means a bad or foreign file
        raise CheckpointError(f"PCA file {path} could not be read ({e}); regenerate it with save_pca.") from e
    suffixes = {k.rpartition(".")[2] for k in tensors}
    if not all(x.isdigit() for x in suffixes):
        raise CheckpointError(f"PCA file {path} has entries not named <kind>.<layer>; regenerate it with save_pca.")
    layers = sorted(int(x) for x in suffixes)
    results = {}
    for layer in layers:
        try:
            results[layer] = PCAResult(
                components=tensors[f"components.{layer}"],
                explained_variance=tensors[f"explained_variance.{layer}"],
                explained_variance_ratio=tensors[f"explained_variance_ratio.{layer}"],
                mean=tensors[f"mean.{layer}"],
                n_tokens=int(meta.get("n_tokens", {}).get(str(layer), 0)),
            )
        except KeyError as e:
            raise CheckpointError(f"PCA file {path} lacks {e.args[0]}; regenerate it with save_pca.") from None
    return results, meta
