"""Directions to ablate for a multiple-choice task: supervised concept directions, or PCA of fine-tuning differences
with probe-guided selection.

All captures run the one ``forward`` with a ``Capture`` spec (caft_jax.discovery); sequences are the task's train
prompts followed by their answer letter, as the authors' PCA uses them (caft_method.md 2.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caft_jax import data
from caft_jax.discovery.concepts import value_list
from caft_jax.discovery.outliers import OutlierRule, detect_outliers, keep_mask
from caft_jax.discovery.pca import StreamingPCA
from caft_jax.discovery.select import Selection, fit_concepts, from_concepts, probe_guided
from caft_jax.errors import ConfigError


def labelled_sequences(tokenizer, items: Sequence[dict], field: str = "spurious_label"):
    """Token ids of prompt + target letter per item, and integer labels of ``field`` with their value names."""
    values = sorted({str(item[field]) for item in items})
    ids = [ex[0] for ex in (data.mc_example(tokenizer, it["prompt"], it["target"]) for it in items)]
    labels = np.asarray([values.index(str(item[field])) for item in items])
    return ids, labels, values


def concept_method_for(method: str, values: Sequence[str], where: str = "the train items") -> str:
    """The estimator for a spurious concept with these values: ``auto`` is class_mean for two, leace for more.

    Raises ConfigError (before any model is loaded) for a single value, or class_mean asked of more than two.
    """
    shown = value_list(values)
    if len(values) < 2:
        raise ConfigError(
            f"the spurious concept has a single value ({shown}) in {where}; a concept direction needs examples of "
            "both values, so use more train items (--n-train) or another task."
        )
    if method == "auto":
        return "class_mean" if len(values) == 2 else "leace"
    if method == "class_mean" and len(values) != 2:
        raise ConfigError(
            f"class-mean directions need a two-valued spurious concept, but {where} have {len(values)} values "
            f"({shown}); use --concept-method leace or inlp (or auto)."
        )
    return method


def concept_selection(
    acts: dict[int, np.ndarray],
    attn_mask: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "class_mean",
    mean_ablation: bool = False,
) -> Selection:
    """Supervised directions of the spurious concept per layer, outliers (sinks, massive dims) handled."""
    return from_concepts(fit_concepts(acts, labels, attn_mask, method=method), mean_ablation=mean_ablation)


def difference_pca(
    base_acts: dict[int, np.ndarray],
    tuned_acts: dict[int, np.ndarray],
    attn_mask: np.ndarray,
    *,
    n_components: int = 20,
    exclude_outliers: bool = True,
) -> dict:
    """PCA of tuned - base activations over all real tokens, per layer (caft_method.md 2.2).

    With ``exclude_outliers``, attention-sink tokens of the base model (e.g. SmolLM2's first token, whose norm is
    ~100x the rest) are left out: their differences would otherwise dominate every component; and the massive
    dimensions are zeroed in the differences, so the components have no weight there. Without that a component
    still reads the sink's huge massive coordinates: on SmolLM2 a layer-12 PC with 0.22 of its weight there had
    |h . q| ~5,100 at the sink against ~7 elsewhere, and ablating it rewrote the sink every layer (~20 with the
    massive coordinates zeroed), as the concept route already avoids.
    Returns {layer: PCAResult}.
    """
    results = {}
    for layer in sorted(base_acts):
        mask, massive = attn_mask, []
        if exclude_outliers:
            outliers = detect_outliers(base_acts[layer], attn_mask)
            mask, massive = keep_mask(base_acts[layer], attn_mask, outliers), list(outliers.massive_dims)
        diff = (tuned_acts[layer] - base_acts[layer])[mask]  # [n_tokens, d]
        diff[:, massive] = 0.0
        results[layer] = StreamingPCA(diff.shape[1]).update(diff).finalize(n_components)
    return results


def pca_probe_selection(
    pcs: dict,
    acts: dict[int, np.ndarray],
    attn_mask: np.ndarray,
    spurious: np.ndarray,
    intended: np.ndarray | None = None,
    *,
    threshold: float = 0.7,
    intended_max: float = 0.7,
    permutations: int = 1000,
) -> Selection:
    """Probe-guided choice among the PCs: keep those whose projection separates the spurious labels.

    Each sequence is scored by its mean projection over real, non-sink tokens. A PC must reach ``threshold`` and,
    with ``permutations``, beat the 95th percentile of the best AUC its layer's PCs reach under shuffled labels
    (with 64 items and 20 PCs chance alone reaches ~0.7). With ``intended`` labels, a PC that also separates the
    intended concept (AUC >= intended_max) is dropped: ablating it would remove the task itself.
    """
    pooled = {}
    for layer, x in acts.items():
        mask = keep_mask(x, attn_mask, detect_outliers(x, attn_mask, rule=OutlierRule()))
        pooled[layer] = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)  # [n_seq, d]
    selection = probe_guided(pcs, pooled, spurious, threshold=threshold, permutations=permutations)
    if intended is None:
        return selection
    keep_ids = {}
    against = probe_guided(pcs, pooled, intended, threshold=0.5).metadata["auc"]
    for layer, chosen in selection.ids.items():
        ok = [j for j in chosen if against[layer][j] < intended_max]
        if ok:
            keep_ids[layer] = ok
    directions = {layer: pcs[layer].components[ids] for layer, ids in keep_ids.items()}
    meta = dict(selection.metadata, intended_auc=against, intended_max=intended_max)
    return Selection(directions, None, keep_ids, meta)
