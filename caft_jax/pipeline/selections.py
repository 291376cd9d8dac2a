"""The pipeline's selections, each one spec file in the discovery folder: the probe-guided (or concept) choice that
discovery writes, and the others a condition may name (``caft@top5``, ``caft@human``): the first k PCs at every
layer, the PC ids of a file a person or an LLM wrote (``discover select --autointerp`` writes one), or the decoder
directions of SAE latents (a spec of ``discover select --sae``, used as it is).

A selection other than the probe's is made from the saved PCs when a condition first needs it, so one can be added
to a finished run with --resume. Each gets the probe's erasure check. A file selection's spec records the sha256 of
its file, and a resume with an edited file is refused rather than ablating stale directions.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from caft_jax import data
from caft_jax.discovery.capture import capture_sequences
from caft_jax.errors import ConfigError
from caft_jax.jsonio import write_json
from caft_jax.pipeline import directions as D
from caft_jax.pipeline.config import DEFAULT_SELECTION, TOP_K_SELECTION, PipelineConfig
from caft_jax.rundir import file_digest


def spec_file(folder: pathlib.Path, selection: str) -> pathlib.Path:
    return folder / ("spec.safetensors" if selection == DEFAULT_SELECTION else f"spec_{selection}.safetensors")


def summary_file(folder: pathlib.Path, selection: str) -> pathlib.Path:
    return folder / ("selection.json" if selection == DEFAULT_SELECTION else f"selection_{selection}.json")


def erasure_summary(
    model, tokenizer, train: Sequence[dict], val: Sequence[dict], directions: Mapping[int, np.ndarray], means=None,
    train_acts: Mapping[int, np.ndarray] | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """The erasure check of a selection on the base model's answer-position activations: probes trained on the
    train items, scored on held-out val items. Returns (mean over the ablated layers, {layer: result}).

    ``train_acts``: the train items' whole-sequence activations when the caller has them ({layer: [n, t, d]}).
    """
    from caft_jax.discovery.erasure import erasure_check_spec

    pad_id = data.pad_token_id(tokenizer)
    layers = sorted(directions)
    ids, spurious, _ = D.labelled_sequences(tokenizer, train, "spurious_label")
    if train_acts is None:
        train_acts = capture_sequences(model, ids, layers, pad_id)[0]
    val_ids, val_spurious, _ = D.labelled_sequences(tokenizer, val, "spurious_label")
    val_acts, _ = capture_sequences(model, val_ids, layers, pad_id)
    by_layer = erasure_check_spec(
        directions,
        {layer: train_acts[layer][:, -1] for layer in layers},  # left-padded: the last position is the answer
        spurious,
        {layer: x[:, -1] for layer, x in val_acts.items()},
        val_spurious,
        means,
    )
    mean = {
        key: float(np.mean([e[key] for e in by_layer.values()]))
        for key in ("probe_accuracy_before", "probe_accuracy_after", "chance")
    }
    return mean, by_layer


def write_summary(folder: pathlib.Path, selection_name: str, selection, erasure: tuple[dict, dict]) -> dict:
    summary = {
        "counts": selection.counts(),
        "erasure": erasure[0],
        "erasure_by_layer": {str(k): v for k, v in erasure[1].items()},
        "metadata": selection.metadata,
    }
    write_json(summary_file(folder, selection_name), summary)
    return summary


def ensure_spec(
    cfg: PipelineConfig, selection: str, folder: pathlib.Path, model, tokenizer, train: Sequence[dict],
    val: Sequence[dict],
) -> pathlib.Path:  # fmt: skip
    """The spec file of ``selection``, made from folder/pca.safetensors if it does not exist yet."""
    path = spec_file(folder, selection)
    files = cfg.selection_files()
    digest = _checked_digest(selection, files[selection]) if selection in files else None
    if path.is_file():
        if digest is not None:
            _check_same_file(path, selection, files[selection], digest)
        return path
    if selection == DEFAULT_SELECTION:
        raise ConfigError(f"{path} is missing; the plain seed-0 run makes it. Rerun with --resume.")
    from caft_jax.discovery.pca import load_pca
    from caft_jax.discovery.select import SelectionError, from_selection_file, top_k_pcs

    try:
        if digest is not None and _holds_sae_latents(selection, files[selection]):
            chosen = _sae_selection(files[selection])
        elif digest is None:
            chosen = top_k_pcs(load_pca(folder / "pca.safetensors")[0], int(TOP_K_SELECTION.fullmatch(selection)[1]))
        else:
            chosen = from_selection_file(load_pca(folder / "pca.safetensors")[0], files[selection])
    except SelectionError as e:
        raise ConfigError(f"selection {selection!r}: {e}") from None
    if cfg.mean_ablation:
        ids = D.labelled_sequences(tokenizer, train)[0]
        acts, mask = capture_sequences(model, ids, sorted(chosen.directions), data.pad_token_id(tokenizer))
        chosen.means = {layer: x[mask].mean(0) for layer, x in acts.items()}
    values = D.labelled_sequences(tokenizer, train)[2]
    extra = {"spurious_values": values} | ({"selection_file_sha256": digest} if digest else {})
    erasure = erasure_summary(model, tokenizer, train, val, chosen.directions, chosen.means)
    chosen.save(path, extra)
    write_summary(folder, selection, chosen, erasure)
    return path


def check_selection_files(cfg: PipelineConfig, layers: Sequence[int], model_path: str) -> None:
    """Refuse (before any model is loaded) a selection file that is missing or unreadable, a PC choice that names a
    layer the run does not discover at or a PC id beyond --n-components, or SAE directions that do not fit the
    model."""
    from caft_jax.discovery.select import SelectionError, read_selection

    for name, path in cfg.selection_files().items():
        _checked_digest(name, path)
        if _holds_sae_latents(name, path):
            _check_sae_spec(name, path, model_path)
            continue
        if cfg.directions != "pca":
            raise ConfigError(
                f"selection file {name}={path} picks PCs by id; use it with --directions pca (an SAE selection of "
                "`discover select --sae` works with either)."
            )
        try:
            chosen = read_selection(path)
        except SelectionError as e:
            raise ConfigError(f"selection file {name}={path}: {e}") from None
        outside = sorted(set(chosen) - set(layers))
        if outside:
            raise ConfigError(
                f"selection file {name}={path} picks PCs at layers {outside}, where the run finds none; it "
                f"discovers at {list(layers)} (--layers)."
            )
        for layer, ids in chosen.items():
            bad = [i for i in ids if i >= cfg.n_components]
            if bad:
                raise ConfigError(
                    f"selection file {name}={path}: layer {layer} ids {bad} are out of range; the run keeps "
                    f"{cfg.n_components} PCs per layer (--n-components)."
                )
        if not any(chosen.values()):
            raise ConfigError(f"selection file {name}={path} picks no PC; give at least one id.")


def _holds_sae_latents(name: str, path: str) -> bool:
    """Whether the file is a spec of SAE decoder directions (used as they are) rather than a choice of PCs."""
    from caft_jax.discovery.select import SAE_CANDIDATES, SelectionError, spec_candidates

    if pathlib.Path(path).suffix not in (".safetensors", ".npz"):
        return False
    try:
        return spec_candidates(path) == SAE_CANDIDATES
    except SelectionError as e:
        raise ConfigError(f"selection file {name}={path}: {e}") from None


def _check_sae_spec(name: str, path: str, model_path: str) -> None:
    from caft_jax.ablation_spec import check_ablation_spec
    from caft_jax.errors import ProjectorError
    from caft_jax.io.hf import model_spec

    spec = model_spec(model_path)
    try:
        check_ablation_spec(path, n_layers=spec.n_layers, d_model=spec.d_model)
    except ProjectorError as e:
        raise ConfigError(f"selection file {name}={path}: {e}") from None


def _sae_selection(path: str):
    """The Selection of a spec of SAE decoder directions, as `discover select --sae` wrote it."""
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.select import Selection

    directions, _, meta = load_ablation_spec(path)
    ids = {int(layer): list(chosen) for layer, chosen in (meta.get("ids") or {}).items()} or None
    return Selection(directions, None, ids, {k: v for k, v in meta.items() if k not in ("ids", "counts")})


def check_file_specs(cfg: PipelineConfig, folder: pathlib.Path) -> None:
    """On a resume: refuse a selection file whose content differs from the one its spec was made from (even when
    every run that uses it is done: the report would name directions that are not the file's)."""
    for name, path in cfg.selection_files().items():
        if spec_file(folder, name).is_file():
            _check_same_file(spec_file(folder, name), name, path, _checked_digest(name, path))


def _checked_digest(name: str, path: str) -> str:
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"selection file {name}={path} does not exist; write it or fix the path.")
    return file_digest(path)


def _check_same_file(spec: pathlib.Path, name: str, path: str, digest: str) -> None:
    from caft_jax.ablation_spec import load_ablation_spec

    made_from = load_ablation_spec(spec)[2].get("selection_file_sha256")
    if made_from != digest:
        raise ConfigError(
            f"the content of selection file {name}={path} differs from the file {spec.name} was made from; restore "
            f"it, or give the new choice another name (--selection-file newname={path} with caft@newname)."
        )
