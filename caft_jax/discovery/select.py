"""Selection: from candidate directions (PCs, SAE latents, concept directions) to an ablation spec file.

Every source returns a ``Selection``: directions {layer: [k, d]} (raw rows; ``build_projector`` runs QR), optional
mean-ablation offsets {layer: [d]}, the chosen ids per layer where the rows come from a candidate set, and
metadata recording the source. ``Selection.save(path)`` writes the file train.py consumes
(``caft_jax.ablation_spec.save_ablation_spec``).

Candidate sets ("sources") are {layer: rows} where rows is a [n, d] array of candidate directions, a
``PCAResult`` (its ``components``), an ``SAE`` (its decoder ``W_dec`` [d_sae, d]), or the ``(results, metadata)``
pair returned by ``load_pca``.

Sources of a selection (caft_method.md sections 2.5-2.6):

* ``from_selection_file``: ids chosen by a person, ``{"12": [3, 5], "14": [0]}``;
* baselines: ``top_k_pcs``, ``random_pcs_like``, ``random_orthonormal``, ``top_k_latents``, ``random_latents``;
* from an SAE ranking (``latent_scores.load_ranking``): ``ranked_latents``, ``random_ranked_latents``;
* ``probe_guided``: candidates whose projection separates labels of the unwanted concept (ROC AUC);
* ``from_concepts``: supervised concept directions (``concept_fit.fit_concept``), optionally with means;
* ``autointerp.from_autointerp``: the features an LLM's explanations of their displays rate as relevant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from caft_jax.ablation_spec import load_ablation_spec, save_ablation_spec
from caft_jax.discovery.concept_fit import fit_concept
from caft_jax.discovery.concepts import ConceptErasure
from caft_jax.errors import CaftError, ProjectorError

# what a spec's "ids" index (its metadata "candidates"; a spec without the key picked PCs)
PCA_CANDIDATES, SAE_CANDIDATES = "pca", "sae"


class SelectionError(CaftError):
    """A selection (ids, counts, candidate set) is malformed or does not fit its candidates."""


@dataclasses.dataclass
class Selection:
    """Directions chosen for ablation, ready to be saved as an ablation spec.

    Attributes:
      directions: {layer: [k, d] float32} raw directions (QR happens in ``build_projector``).
      means: optional {layer: [d]} mean-ablation offsets.
      ids: {layer: [ids]} of the chosen candidates (None for directions not drawn from a candidate set).
      metadata: JSON-serialisable provenance: "source", parameters, scores.
    """

    directions: dict[int, np.ndarray]
    means: dict[int, np.ndarray] | None = None
    ids: dict[int, list[int]] | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[int, int]:
        """Number of directions per layer."""
        return {layer: int(len(d)) for layer, d in self.directions.items()}

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> pathlib.Path:
        """Write the ablation spec (``.safetensors`` or ``.npz``); layers with no directions are left out."""
        directions = {layer: d for layer, d in self.directions.items() if len(d)}
        if not directions:
            raise SelectionError("the selection is empty (no layer has a direction); there is nothing to ablate.")
        meta = dict(self.metadata)
        if self.ids is not None:
            meta["ids"] = {str(layer): list(map(int, ids)) for layer, ids in self.ids.items() if len(ids)}
        meta["counts"] = {str(layer): int(len(d)) for layer, d in directions.items()}
        meta.update(extra_metadata or {})
        means = {layer: m for layer, m in (self.means or {}).items() if layer in directions}
        return save_ablation_spec(path, directions, means or None, jsonable(meta))


def jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------------------------
# Candidate sets and selection files
# ---------------------------------------------------------------------------------------------------------------


def candidate_rows(source, layer: int) -> np.ndarray:
    """The candidate directions [n, d] (float64) of ``source`` at ``layer`` (see the module docstring)."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Mapping):
        source = source[0]  # (results, metadata) from load_pca
    if not isinstance(source, Mapping):
        raise SelectionError(f"candidates must be a mapping {{layer: rows}}; got {type(source).__name__}.")
    if layer not in source:
        raise SelectionError(f"layer {layer} has no candidates; available layers: {sorted(source)}.")
    rows = source[layer]
    for attr in ("components", "W_dec"):
        if hasattr(rows, attr):
            rows = getattr(rows, attr)
            break
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2:
        raise SelectionError(f"candidates for layer {layer} must be [n, d_model]; got shape {rows.shape}.")
    return rows


def _layers(source) -> list[int]:
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Mapping):
        source = source[0]
    if not isinstance(source, Mapping):
        raise SelectionError(f"candidates must be a mapping {{layer: rows}}; got {type(source).__name__}.")
    return sorted(int(layer) for layer in source)


def read_selection(
    selection: Mapping | str | os.PathLike, candidates: str | None = PCA_CANDIDATES
) -> dict[int, list[int]]:
    """Parse and validate a selection {layer: [ids]} given as a mapping or a JSON file path.

    JSON keys are layer numbers as strings, e.g. ``{"12": [3, 5], "14": [0]}``; ids are non-negative integers
    without repeats. An optional top-level "layers" key holding such a mapping is accepted too, and so is a spec
    file that ``discover select`` wrote (its ids, e.g. an autointerp choice) when it picked ``candidates`` ("pca"
    or "sae") too (None: either, for a caller that needs only the counts).
    """
    where = "selection"
    if isinstance(selection, (str, os.PathLike)) and pathlib.Path(selection).suffix in (".safetensors", ".npz"):
        where, selection = str(selection), _spec_ids(selection, candidates)
    elif isinstance(selection, (str, os.PathLike)):
        where = str(selection)
        try:
            selection = json.loads(pathlib.Path(selection).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SelectionError(f"{where}: selection file not found.") from None
        except json.JSONDecodeError as e:
            raise SelectionError(f'{where}: invalid JSON ({e.msg}); write {{"layer": [ids]}}.') from None
    if isinstance(selection, Mapping) and isinstance(selection.get("layers"), Mapping):
        selection = selection["layers"]
    if not isinstance(selection, Mapping):
        raise SelectionError(f'{where} must be a mapping {{"layer": [ids]}}, e.g. {{"12": [3, 5]}}.')
    out: dict[int, list[int]] = {}
    for key, ids in selection.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise SelectionError(f"{where}: key {key!r} is not a layer number.") from None
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SelectionError(f"{where}: layer {layer} must map to a list of integer ids; got {ids!r}.")
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise SelectionError(f"{where}: layer {layer} ids {list(ids)} must be non-negative and distinct.")
        out[layer] = [int(i) for i in ids]
    return out


def spec_candidates(path) -> str:
    """What the ids of a spec that ``discover select`` wrote index: "pca" (PCs) or "sae" (SAE latents)."""
    if not pathlib.Path(path).is_file():
        raise SelectionError(f"{path}: selection file not found.")
    try:
        return load_ablation_spec(path)[2].get("candidates", PCA_CANDIDATES)
    except ProjectorError as e:
        raise SelectionError(str(e)) from None


def _spec_ids(path, candidates: str | None) -> dict:
    found = spec_candidates(path)
    if candidates is not None and found != candidates:
        raise SelectionError(
            f"{path} holds a selection of {found} candidates, not of {candidates} ones; choose from the candidates it "
            f"was made from."
        )
    ids = load_ablation_spec(path)[2].get("ids")
    if not isinstance(ids, Mapping):
        raise SelectionError(
            f"{path} holds directions but no ids of the candidates they came from; write a JSON "
            '{"layer": [ids]} file or make the spec with `python -m caft_jax.discover select`.'
        )
    return ids


def _rows_by_ids(source, ids: Mapping[int, Sequence[int]]) -> dict[int, np.ndarray]:
    directions = {}
    for layer, chosen in ids.items():
        rows = candidate_rows(source, layer)
        bad = [i for i in chosen if i >= len(rows)]
        if bad:
            raise SelectionError(f"layer {layer} ids {bad} are out of range; there are {len(rows)} candidates.")
        directions[int(layer)] = rows[list(chosen)].astype(np.float32)
    return directions


def from_selection_file(
    pca_or_sae, selection: Mapping | str | os.PathLike, *, means: Mapping[int, np.ndarray] | None = None,
    candidates: str = PCA_CANDIDATES,
) -> Selection:  # fmt: skip
    """Directions chosen by id: ``selection`` {layer: [ids]} (mapping or JSON file) picks rows of the candidates.

    Args:
      pca_or_sae: candidate source {layer: PCAResult | SAE | [n, d]} (or load_pca's pair).
      selection: {layer: [ids]}.
      means: optional mean-ablation offsets {layer: [d]}.
      candidates: what the ids index, "pca" or "sae" (recorded in the spec, and checked in a spec file given as
        ``selection``).
    """
    ids = {layer: chosen for layer, chosen in read_selection(selection, candidates).items() if chosen}
    meta = {"source": "selection_file"} | ({"candidates": candidates} if candidates != PCA_CANDIDATES else {})
    if isinstance(selection, (str, os.PathLike)):
        meta["selection_file"] = str(selection)
    return Selection(_rows_by_ids(pca_or_sae, ids), _means(means, ids), ids, meta)


def _means(means, layers) -> dict[int, np.ndarray] | None:
    if means is None:
        return None
    return {int(layer): np.asarray(means[layer], np.float32) for layer in layers if layer in means}


# ---------------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------------


def top_k_pcs(pcs, k: int, *, layers: Sequence[int] | None = None) -> Selection:
    """The first ``k`` PCs at every layer (or at ``layers``): the authors' "top PCs" baseline."""
    if k < 1:
        raise SelectionError(f"k must be at least 1; got {k}.")
    layers = _layers(pcs) if layers is None else [int(layer) for layer in layers]
    ids = {}
    for layer in layers:
        n = len(candidate_rows(pcs, layer))
        if k > n:
            raise SelectionError(f"layer {layer} has only {n} PCs; k={k} is too many.")
        ids[layer] = list(range(k))
    return Selection(_rows_by_ids(pcs, ids), None, ids, {"source": "top_k_pcs", "k": k})


def random_pcs_like(pcs, selection, seed: int = 0, *, pool: int = 20) -> Selection:
    """Random PCs with the same count per layer as ``selection``, uniform without replacement from the top ``pool``.

    ``selection`` is a {layer: [ids]} mapping / file, or a ``Selection``. The spurious-task baseline of the paper.
    """
    counts = (
        selection.counts()
        if isinstance(selection, Selection)
        else {layer: len(ids) for layer, ids in read_selection(selection, None).items()}
    )
    rng = np.random.default_rng(seed)
    ids = {}
    for layer in sorted(counts):
        if counts[layer] == 0:
            continue
        n = min(pool, len(candidate_rows(pcs, layer)))
        if counts[layer] > n:
            raise SelectionError(f"layer {layer} needs {counts[layer]} random PCs but only {n} are in the pool.")
        ids[layer] = sorted(int(i) for i in rng.choice(n, counts[layer], replace=False))
    meta = {"source": "random_pcs_like", "seed": seed, "pool": pool}
    return Selection(_rows_by_ids(pcs, ids), None, ids, meta)


def random_orthonormal(d_model: int, counts: Mapping[int, int], seed: int = 0) -> Selection:
    """Random orthonormal vectors, ``counts[layer]`` per layer (Haar-distributed, like scipy's ortho_group rows)."""
    rng = np.random.default_rng(seed)
    directions = {}
    for layer in sorted(int(x) for x in counts):
        k = int(counts[layer])
        if not 0 < k <= d_model:
            raise SelectionError(f"layer {layer} asks for {k} random vectors; use 1..d_model={d_model}.")
        q, r = np.linalg.qr(rng.normal(size=(d_model, k)))
        q *= np.sign(np.diag(r))  # sign fix makes the distribution uniform (Haar)
        directions[layer] = q.T.astype(np.float32)
    meta = {"source": "random_orthonormal", "seed": seed, "d_model": d_model}
    return Selection(directions, None, None, meta)


def top_k_latents(
    decoders, effects: Mapping[int, np.ndarray], k: int = 10, *, per_layer: bool = True, largest: bool = True
) -> Selection:
    """Top-``k`` SAE latents by attribution effect, per layer or globally across layers; rows of W_dec.

    Args:
      decoders: {layer: SAE | W_dec [d_sae, d]}.
      effects: {layer: [d_sae]} attribution scores (``sae_attribution`` or other rankings).
      k: per layer, or in total when ``per_layer`` is False (the spurious tasks' global top-k).
      largest: rank by signed effect descending (the authors' ``topk(effect)``); False ranks ascending.
    """
    from caft_jax.discovery.latent_scores import rank_latents

    ranked = rank_latents({int(x): np.asarray(v) for x, v in effects.items()}, k, per_layer=per_layer, largest=largest)
    chosen = ranked_latents(decoders, ranked, k)
    scores = {layer: [float(np.asarray(effects[layer])[i]) for i in ids] for layer, ids in chosen.ids.items()}
    chosen.metadata = {"source": "top_k_latents", "k": k, "per_layer": per_layer, "largest": largest,
                       "effects": scores, "candidates": SAE_CANDIDATES}  # fmt: skip
    return chosen


def ranked_latents(decoders, ranked: Mapping[int, Sequence[int]], k: int) -> Selection:
    """The first ``k`` latents of each layer's ranking ({layer: [ids, best first]}, e.g. ``load_ranking``'s) as
    rows of W_dec; layers whose ranking is empty are left out."""
    if k < 1:
        raise SelectionError(f"k must be at least 1 latent per layer; got {k}.")
    ids = {int(layer): [int(i) for i in chosen[:k]] for layer, chosen in ranked.items() if len(chosen)}
    if not ids:
        raise SelectionError("the ranking has no latent at any layer; there is nothing to select.")
    meta = {"source": "ranked_latents", "k": k, "candidates": SAE_CANDIDATES}
    return Selection(_rows_by_ids(decoders, ids), None, ids, meta)


def random_latents(
    decoders,
    effects: Mapping[int, np.ndarray],
    k: int = 10,
    seed: int = 0,
    *,
    pool: int = 100,
    like=None,
) -> Selection:
    """Random SAE latents from the attributed set: per layer, ``k`` (or as many as ``like`` has there) drawn
    uniformly without replacement from the top-``pool`` latents by effect."""
    from caft_jax.discovery.latent_scores import rank_latents

    ranked = rank_latents({int(x): np.asarray(v) for x, v in effects.items()}, pool)
    if isinstance(like, Selection):
        counts = like.counts()
    elif like is not None:
        counts = {x: len(v) for x, v in read_selection(like, None).items()}
    else:
        counts = {layer: k for layer in ranked}
    chosen = random_ranked_latents(decoders, ranked, counts, seed)
    chosen.metadata |= {"source": "random_latents", "pool": pool, "k": k if like is None else None}
    return chosen


def random_ranked_latents(
    decoders, ranked: Mapping[int, Sequence[int]], counts: Mapping[int, int], seed: int = 0
) -> Selection:
    """Per layer, ``counts[layer]`` latents drawn uniformly without replacement from that layer's ranking."""
    rng = np.random.default_rng(seed)
    ids = {}
    for layer in sorted(counts):
        if counts[layer] == 0:
            continue
        if layer not in ranked:
            raise SelectionError(f"layer {layer} has no ranked latents to draw random latents from.")
        candidates = ranked[layer]
        if counts[layer] > len(candidates):
            raise SelectionError(
                f"layer {layer} needs {counts[layer]} random latents but the pool has {len(candidates)}."
            )
        ids[layer] = sorted(int(candidates[i]) for i in rng.choice(len(candidates), counts[layer], replace=False))
    meta = {"source": "random_ranked_latents", "seed": seed, "candidates": SAE_CANDIDATES}
    return Selection(_rows_by_ids(decoders, ids), None, ids, meta)


# ---------------------------------------------------------------------------------------------------------------
# Probe-guided selection
# ---------------------------------------------------------------------------------------------------------------


def separation_auc(projections, labels) -> float:
    """|AUC - 0.5| + 0.5 of scores [n] against labels [n]: 1 separates perfectly (either sign), 0.5 not at all.

    For more than two label values, the largest one-vs-rest value.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise SelectionError("labels have a single value; probe-guided selection needs both values of the concept.")
    targets = [labels == classes[1]] if len(classes) == 2 else [labels == c for c in classes]
    return max(abs(roc_auc_score(t, projections) - 0.5) + 0.5 for t in targets)


def separation_aucs(projections, labels) -> np.ndarray:
    """``separation_auc`` of every column of projections [n, m] at once (rank sums; ties get average ranks)."""
    from scipy.stats import rankdata

    return _aucs_from_ranks(rankdata(np.asarray(projections, np.float64), axis=0), labels)


def _aucs_from_ranks(ranks: np.ndarray, labels) -> np.ndarray:
    labels = np.asarray(labels)
    classes = np.unique(labels)
    targets = [labels == classes[1]] if len(classes) == 2 else [labels == c for c in classes]
    best = np.full(ranks.shape[1], 0.5)
    for t in targets:
        n1 = t.sum()
        auc = (ranks[t].sum(0) - n1 * (n1 + 1) / 2) / (n1 * (len(t) - n1))
        best = np.maximum(best, np.abs(auc - 0.5) + 0.5)
    return best


def null_threshold(projections, labels, *, permutations: int = 1000, quantile: float = 0.95, seed: int = 0) -> float:
    """The ``quantile`` of the best separation AUC among all candidates [n, m] under shuffled labels.

    With few labelled examples and many candidates the best AUC of pure noise is high (n = 64 items and 20 PCs
    give ~0.7, the rule's usual fixed threshold), so a candidate must beat what the same search finds by chance.
    """
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    ranks = rankdata(np.asarray(projections, np.float64), axis=0)  # shuffling labels leaves the ranks alone
    best = [_aucs_from_ranks(ranks, rng.permutation(labels)).max() for _ in range(permutations)]
    return float(np.quantile(best, quantile))


def probe_guided(
    candidates,
    acts: Mapping[int, np.ndarray],
    labels,
    *,
    threshold: float = 0.7,
    means: Mapping[int, np.ndarray] | None = None,
    permutations: int = 0,
    null_quantile: float = 0.95,
) -> Selection:
    """Keep the candidate directions whose projection separates the labels of the unwanted concept.

    Args:
      candidates: {layer: PCAResult | SAE | [n_cand, d]} candidate directions.
      acts: {layer: [n, d]} activations of labelled examples at that layer (e.g. the last prompt token).
      labels: [n] values of the unwanted concept (e.g. the spurious question's answer), or {layer: [n]}.
      threshold: keep a candidate when |AUC - 0.5| + 0.5 >= threshold.
      means: optional mean-ablation offsets {layer: [d]}.
      permutations: with > 0, a layer's threshold is also at least ``null_threshold`` (the ``null_quantile`` of
        the layer's best AUC under that many label shuffles), so chance-level candidates are not kept.
    Returns:
      Selection; metadata["auc"] has every candidate's score per layer.
    """
    if not 0.5 <= threshold <= 1.0:
        raise SelectionError(f"threshold must be in [0.5, 1]; got {threshold}.")
    ids, aucs, nulls = {}, {}, {}
    for layer in sorted(int(x) for x in acts):
        rows = candidate_rows(candidates, layer)
        x = np.asarray(acts[layer], np.float64)
        y = np.asarray(labels[layer] if isinstance(labels, Mapping) else labels)
        if x.ndim != 2 or x.shape[1] != rows.shape[1] or y.shape != (len(x),):
            raise SelectionError(
                f"layer {layer}: activations {x.shape} and labels {y.shape} must be [n, d={rows.shape[1]}] and [n]."
            )
        if len(np.unique(y)) < 2:
            raise SelectionError("labels have a single value; probe-guided selection needs both values of the concept.")
        projections = x @ rows.T  # [n, n_cand]
        scores = separation_aucs(projections, y)
        aucs[layer] = [round(float(s), 6) for s in scores]
        cut = threshold
        if permutations:
            null = null_threshold(projections, y, permutations=permutations, quantile=null_quantile, seed=layer)
            nulls[layer], cut = round(null, 6), max(threshold, null)
        chosen = [j for j, s in enumerate(scores) if s >= cut]
        if chosen:
            ids[layer] = chosen
    meta = {"source": "probe_guided", "threshold": threshold, "auc": aucs}
    if permutations:
        meta |= {"null_threshold": nulls, "permutations": permutations, "null_quantile": null_quantile}
    return Selection(_rows_by_ids(candidates, ids), _means(means, ids), ids, meta)


# ---------------------------------------------------------------------------------------------------------------
# Supervised concept directions
# ---------------------------------------------------------------------------------------------------------------


def fit_concepts(acts_by_layer: Mapping[int, np.ndarray], labels, mask=None, **kwargs) -> dict[int, ConceptErasure]:
    """``concept_fit.fit_concept`` at each layer: acts {layer: [n_seq, t, d]}, labels [n_seq] or [n_seq, t]."""
    return {int(layer): fit_concept(acts, labels, mask, **kwargs) for layer, acts in sorted(acts_by_layer.items())}


def from_concepts(erasures: Mapping[int, ConceptErasure], *, mean_ablation: bool = False) -> Selection:
    """Supervised concept directions {layer: ConceptErasure} as a selection, with their means if ``mean_ablation``.

    The metadata records each layer's method, rank, token count and the outliers found and handled.
    """
    directions = {int(layer): e.directions.astype(np.float32) for layer, e in erasures.items() if len(e.directions)}
    means = {layer: erasures[layer].mean.astype(np.float32) for layer in directions} if mean_ablation else None
    meta = {
        "source": "concept",
        "mean_ablation": mean_ablation,
        "layers": {str(layer): jsonable(e.info) | {"method": e.method} for layer, e in erasures.items()},
    }
    return Selection(directions, means, None, meta)
