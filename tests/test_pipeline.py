"""End-to-end tests of ``python -m caft_jax.pipeline`` on a tiny random Llama, plus the pieces it relies on.

One concept-direction run (2 seeds) is shared by most tests. To keep its cost down on a small CPU:
* the task comes from a small template CSV (``--source``) whose prompts all fall into one padding bucket, so each
  fine-tune compiles its step once;
* the module enables JAX's persistent compilation cache in a temporary folder (restored afterwards), so runs whose
  step program is identical (plain seed 0 / seed 1, caft / random) compile once.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import save_hf_model, tiny_tokenizer

from caft_jax import data, load_model, load_tokenizer
from caft_jax.ablation_spec import load_ablation_spec
from caft_jax.batching import MC_TRAIN_SIZES
from caft_jax.discovery.capture import capture_sequences
from caft_jax.errors import ConfigError, DataError
from caft_jax.optim import OptimConfig
from caft_jax.pipeline import cli, report, runner
from caft_jax.pipeline.config import PipelineConfig, default_recipe, parse_layers
from caft_jax.pipeline.runs import finetune, mc_examples
from caft_jax.pipeline.selections import check_selection_files
from caft_jax.projector import ablate, build_projector
from caft_jax.sharding import make_mesh
from caft_jax.tasks import gender
from caft_jax.train_step import CaftTrainer

CONDITIONS = ("plain", "caft", "random")
N_LAYERS, D_MODEL = 3, 64  # tests/hf_models.py COMMON


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random 3-layer Llama with the 300-token tiny tokenizer, saved as a HF folder."""
    path = tmp_path_factory.mktemp("pipeline_llama")
    save_hf_model("llama", path, vocab_size=300)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def short_source(tmp_path_factory) -> str:
    """20 + 20 short gender templates: 32 train, 8 val, 8 test items, all prompts 97-128 tokens long."""
    verbs = ["said", "felt", "knew", "hoped", "noted", "thought", "claimed", "argued", "agreed", "feared"]
    obj_verbs = ["met", "saw", "paid", "hired", "called", "helped", "thanked", "visited", "praised", "trusted"]
    rows = [(f"The $PROFESSION$ {v} $PRONOUN$ {e}.", "nominative") for v in verbs for e in ("was late", "had left")]
    rows += [
        (f"The team {v} the $PROFESSION$ and {e} $PRONOUN$.", "object")
        for v in obj_verbs
        for e in ("thanked", "greeted")
    ]
    path = tmp_path_factory.mktemp("gender_source") / "short.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a temp folder for this module; the previous settings come back after."""
    from jax.experimental.compilation_cache import compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    new = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
    for key, value in zip(keys, new, strict=True):
        jax.config.update(key, value)
    compilation_cache.reset_cache()
    yield
    for key, value in old.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()


def pipeline_args(model: str, source: str, out, *extra: str) -> list[str]:
    # lr 1e-2 for 2 epochs (4 steps): enough for the random model to start answering A/B (accuracy > 0)
    return [
        "--model", model, "--source", source, "--out", str(out), "--layers", "0,1", "--n-train", "16",
        "--n-eval", "8", "--batch-size", "8", "--epochs", "2", "--seeds", "2", "--lr", "1e-2", "--displays", "2",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model, short_source, compile_cache, tmp_path_factory) -> dict:
    """One pipeline run (concept directions, 2 seeds x plain/caft/random), shared by the tests below."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    argv = pipeline_args(tiny_model, short_source, out)
    rc = cli.main(argv)
    return {"rc": rc, "out": out, "argv": argv}


def read_runs(out: pathlib.Path) -> dict[tuple[str, int], dict]:
    return {(c, s): json.loads((out / "runs" / f"{c}_seed{s}.json").read_text()) for c in CONDITIONS for s in range(2)}


def mean_sem(values: list[float]) -> str:
    values = np.asarray(values, np.float64)
    sem = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {sem:.3f}"


# ---------------------------------------------------------------------------------------------------- the run


def test_run_writes_every_file(run):
    assert run["rc"] == 0
    out = run["out"]
    expected = [
        "manifest.json", "base.json", "task/train.jsonl", "task/val.jsonl", "task/test.jsonl",
        "directions/spec.safetensors", "directions/selection.json", "directions/displays.html",
        "directions/displays.json", "results.md", "results.csv", "results.json", "results.png",
    ] + [f"runs/{c}_seed{s}.json" for c in CONDITIONS for s in (0, 1)]  # fmt: skip
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{c}_seed{s}.json" for c in CONDITIONS for s in (0, 1)
    )
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "directions" / runner.PLAIN_MODEL).exists()  # kept only with --keep-plain
    # the whole split is written (subsampling happens per run), from the --source templates
    sizes = {s: len(data.load_mc_jsonl(out / "task" / f"{s}.jsonl")) for s in ("train", "val", "test")}
    assert sizes == {"train": 32, "val": 8, "test": 8}
    manifest = json.loads((out / "manifest.json").read_text())
    settings = manifest["recipe"]
    assert "out" not in settings and "output_dir" not in settings["train"]
    assert settings["train"]["optim"]["lr"] == 1e-2 and settings["seeds"] == 2 and settings["layers"] == "0,1"
    assert settings["train"]["optim"]["betas"] == [0.9, 0.95] and settings["train"]["lora"] is None
    assert manifest["model"]["fingerprint"] and set(manifest["inputs"]) == {"source"}
    base = json.loads((out / "base.json").read_text())
    assert set(base) == {"val", "test"} and all(0 <= v <= 1 for v in base.values())
    displays = json.loads((out / "directions" / "displays.json").read_text())
    assert [(f["layer"], f["index"]) for f in displays["features"]] == [(0, 0), (1, 0)]  # --displays 2
    assert "<html" in (out / "directions" / "displays.html").read_text().lower()


def test_results_csv_has_one_row_per_run(run):
    runs = read_runs(run["out"])
    with open(run["out"] / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["condition"], int(r["seed"])) for r in rows) == sorted(runs)
    for row in rows:
        mine = runs[(row["condition"], int(row["seed"]))]
        for split in ("val", "test"):
            assert 0 <= float(row[split]) <= 1
            assert float(row[split]) == mine[split]
        if row["condition"] == "plain":
            assert row.get("test_kept", "") == "" and mine["test_kept"] is None
        else:
            assert 0 <= float(row["test_kept"]) <= 1 and float(row["test_kept"]) == mine["test_kept"]
        assert int(row["steps"]) == 4  # 16 items / batch 8 x 2 epochs
    assert json.loads((run["out"] / "results.json").read_text()) == [runs[(c, s)] for s in (0, 1) for c in CONDITIONS]


def test_results_md_is_mean_and_standard_error_of_the_runs(run):
    out = run["out"]
    runs = read_runs(out)
    lines = (out / "results.md").read_text().splitlines()
    base = json.loads((out / "base.json").read_text())
    assert f"| base model (no fine-tuning) | - | {base['val']:.3f} | {base['test']:.3f} | - |" in lines
    for condition in CONDITIONS:
        mine = [runs[(condition, s)] for s in (0, 1)]
        cells = [mean_sem([r[k] for r in mine]) for k in ("val", "test")]
        cells.append("-" if condition == "plain" else mean_sem([r["test_kept"] for r in mine]))
        assert f"| {condition} | 2 | " + " | ".join(cells) + " |" in lines
    assert sum(line.startswith("| ") for line in lines) == 1 + 1 + 3  # header, base, one per condition
    # erasure: selection.json's summary is the mean over the ablated layers, and results.md reports it
    selection = json.loads((out / "directions" / "selection.json").read_text())
    by_layer = selection["erasure_by_layer"]
    assert sorted(by_layer) == ["0", "1"]
    for key in ("probe_accuracy_before", "probe_accuracy_after", "chance"):
        assert selection["erasure"][key] == pytest.approx(np.mean([by_layer[k][key] for k in by_layer]))
    e = selection["erasure"]
    sentence = (
        f"{e['probe_accuracy_before']:.3f} before ablation, {e['probe_accuracy_after']:.3f} after "
        f"(chance {e['chance']:.3f})."
    )
    assert any(line.startswith("Erasure check") and line.endswith(sentence) for line in lines)


def test_spec_directions_are_removed_by_the_projector(run):
    directions, means, meta = load_ablation_spec(run["out"] / "directions" / "spec.safetensors")
    assert sorted(directions) == [0, 1] and means == {}
    assert all(d.shape == (1, D_MODEL) for d in directions.values())
    assert meta["spurious_values"] == ["doctor", "nurse"] and meta["source"] == "concept"
    projector = build_projector(directions, N_LAYERS, D_MODEL)
    assert projector.ranks().tolist() == [1, 1, 0]
    h = np.random.default_rng(0).normal(size=(2, 5, D_MODEL)).astype(np.float32)
    for layer in (0, 1):
        q = np.linalg.qr(directions[layer].T.astype(np.float64))[0]  # [d, 1], independent of the projector
        out = np.asarray(ablate(jnp.asarray(h), projector.basis[layer], projector.offset[layer]), np.float64)
        assert np.linalg.norm(out @ q) < 1e-5 * np.linalg.norm(h @ q)
        np.testing.assert_allclose(out, h - (h @ q) @ q.T, atol=1e-5)  # the rest of h is untouched
    out = np.asarray(ablate(jnp.asarray(h), projector.basis[2], projector.offset[2]))
    np.testing.assert_array_equal(out, h)  # layer 2 has no directions: exact no-op


def test_concept_directions_are_class_mean_differences(run, tiny_model):
    """Recompute doctor -> nurse class-mean differences over all real tokens of the 16 train sequences."""
    out = run["out"]
    train = runner.subsample(data.load_mc_jsonl(out / "task" / "train.jsonl"), 16)
    assert len(train) == 16 and {it["spurious_label"] for it in train} == {"doctor", "nurse"}
    tokenizer, model = load_tokenizer(tiny_model), load_model(tiny_model)
    ids = []
    for item in train:
        target = tokenizer(item["target"])["input_ids"]
        assert len(target) == 1
        ids.append(list(tokenizer(item["prompt"])["input_ids"]) + target)
    acts, mask = capture_sequences(model, ids, [0, 1], tokenizer.pad_token_id)
    nurse = np.array([it["spurious_label"] == "nurse" for it in train])[:, None] & mask
    doctor = ~nurse & mask
    directions, _, meta = load_ablation_spec(out / "directions" / "spec.safetensors")
    for layer in (0, 1):
        info = meta["layers"][str(layer)]
        # the tiny model has no attention sinks or massive dimensions, so outlier handling changes nothing and
        # the spec's direction must be the plain class-mean difference
        assert info["outliers"]["sink_positions"] == [] and info["outliers"]["massive_dims"] == []
        assert info["n_tokens"] == int(mask.sum()) == sum(len(i) for i in ids)
        x = acts[layer].astype(np.float64)
        expected = x[nurse].mean(0) - x[doctor].mean(0)
        got = directions[layer][0].astype(np.float64)
        assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) > 1 - 1e-6
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_resume_redoes_only_the_missing_run(run, monkeypatch, tmp_path):
    out = tmp_path / "resumed"  # a copy, so the shared run stays intact (settings exclude --out)
    shutil.copytree(run["out"], out)
    original = json.loads((out / "runs" / "random_seed1.json").read_text())
    (out / "runs" / "random_seed1.json").unlink()
    for name in ("results.md", "results.csv", "results.json", "results.png"):
        (out / name).unlink()
    settings = (out / "manifest.json").read_text()
    # every other file must be left alone (manifest.json is rewritten on resume, with the same content)
    kept = [p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    calls = []

    def counting_finetune(*args, **kwargs):
        calls.append((kwargs["seed"], kwargs["projector"] is not None))
        return finetune(*args, **kwargs)

    monkeypatch.setattr(runner, "finetune", counting_finetune)
    argv = list(run["argv"])
    argv[argv.index("--out") + 1] = str(out)
    assert cli.main([*argv, "--resume"]) == 0
    assert calls == [(1, True)]  # only random seed 1 was trained again
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes
    assert (out / "manifest.json").read_text() == settings
    for name in ("results.md", "results.csv", "results.json", "results.png"):
        assert (out / name).is_file()
    redone = json.loads((out / "runs" / "random_seed1.json").read_text())
    for key in ("condition", "seed", "steps", "val", "test", "test_kept"):
        assert redone[key] == original[key]  # same seed, same random directions, same result
    assert redone["final_loss"] == pytest.approx(original["final_loss"], rel=1e-5)

    def table(folder):  # the notes below the table name the run folder, so compare the table and erasure lines
        lines = (folder / "results.md").read_text().splitlines()
        return [line for line in lines if line.startswith(("|", "Erasure"))]

    assert len(table(out)) == 7 and table(out) == table(run["out"])


def test_keep_plain_exports_the_plain_fine_tune(run, tiny_model, short_source, compile_cache, tmp_path, capsys):
    import transformers

    out = tmp_path / "kept"
    argv = pipeline_args(tiny_model, short_source, out, "--seeds", "1", "--conditions", "plain", "--keep-plain")
    assert cli.main(argv) == 0
    kept = transformers.AutoModelForCausalLM.from_pretrained(out / "directions" / runner.PLAIN_MODEL)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in kept.state_dict().items() if not np.array_equal(p.numpy(), base.state_dict()[n].numpy())]
    assert changed and len(kept.state_dict()) == len(base.state_dict())
    assert not (out / "directions" / (runner.PLAIN_MODEL + ".partial")).exists()
    # a finished run without it has nothing left to keep: refused before loading, nothing changed
    copy = tmp_path / "not_kept"
    shutil.copytree(run["out"], copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    argv = list(run["argv"])
    argv[argv.index("--out") + 1] = str(copy)
    assert cli.main([*argv, "--resume", "--keep-plain"]) == 2
    err = capsys.readouterr().err
    assert "--keep-plain" in err and "plain_seed0.json" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_changed_setting_is_refused(run, capsys):
    before = {p: p.read_bytes() for p in run["out"].rglob("*") if p.is_file()}
    argv = list(run["argv"])
    argv[argv.index("--lr") + 1] = "2e-3"
    assert cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.optim.lr: 0.01 in the run, 0.002 requested" in err and str(run["out"]) in err
    # without --resume or --overwrite a folder holding a run is refused outright
    assert cli.main(run["argv"]) == 2
    assert "--resume to continue it, --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run["out"].rglob("*") if p.is_file()} == before


def test_pca_selections_top_k_and_files_in_one_run(
    tiny_model, short_source, compile_cache, tmp_path, capsys, monkeypatch
):
    """caft@top2 ablates the first 2 PCs at every layer; a selection file added on --resume (caft@human) is made
    into its own spec from the saved PCs, only the new runs run, and an edited file is refused. The probe-guided
    rule keeps nothing here, which only stops a run whose conditions use it."""
    from caft_jax.discovery.pca import load_pca
    from caft_jax.discovery.select import Selection
    from caft_jax.pipeline import directions

    monkeypatch.setattr(directions, "pca_probe_selection", lambda *a, **k: Selection({}, None, {}, {"auc": {}}))
    out = tmp_path / "pca"
    argv = pipeline_args(tiny_model, short_source, out, "--seeds", "1", "--directions", "pca", "--displays", "3")
    assert cli.main([*argv, "--out", str(tmp_path / "probe"), "--conditions", "plain,caft"]) == 2
    assert "no PC separates the spurious concept" in capsys.readouterr().err
    assert cli.main([*argv, "--conditions", "plain,caft@top2"]) == 0
    assert (out / "directions" / "no_selection.json").is_file() and not (
        out / "directions" / "spec.safetensors"
    ).exists()
    assert json.loads((out / "directions" / "selection.json").read_text())["counts"] == {}
    pcs, _ = load_pca(out / "directions" / "pca.safetensors")
    assert sorted(pcs) == [0, 1] and pcs[0].components.shape == (20, D_MODEL)
    directions, _, meta = load_ablation_spec(out / "directions" / "spec_top2.safetensors")
    for layer in (0, 1):
        np.testing.assert_array_equal(directions[layer], pcs[layer].components[:2])
    assert meta["ids"] == {"0": [0, 1], "1": [0, 1]} and meta["source"] == "top_k_pcs"
    top2 = json.loads((out / "directions" / "selection_top2.json").read_text())
    assert top2["counts"] == {"0": 2, "1": 2} and set(top2["erasure"]) == {
        "probe_accuracy_before", "probe_accuracy_after", "chance"}  # fmt: skip
    # with no probe choice the displays show each layer's first PC, by id, contrasting base and fine-tuned
    # projections on the same tokens
    features = json.loads((out / "directions" / "displays.json").read_text())["features"]
    assert [(f["layer"], f["index"], f["kind"]) for f in features] == [(0, 0, "pc"), (1, 0, "pc")]
    for f in features:
        contrast = f["contrast"]
        assert sum(contrast["base_counts"]) == sum(contrast["tuned_counts"]) > 0
        assert contrast["tuned_mean"] != contrast["base_mean"] and f["histogram"]["n_tokens"] > 0
    before = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    assert set(before) == {"plain_seed0.json", "caft@top2_seed0.json"}

    human = tmp_path / "human.json"
    human.write_text(json.dumps({"0": [0], "1": [0, 3]}))
    more = [*argv, "--selection-file", f"human={human}", "--conditions", "plain,caft@top2,caft@human,random@human"]
    assert cli.main([*more, "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "runs").iterdir() if p.name in before} == before
    assert {p.name for p in (out / "runs").iterdir()} == set(before) | {"caft@human_seed0.json",
                                                                         "random@human_seed0.json"}  # fmt: skip
    directions, _, meta = load_ablation_spec(out / "directions" / "spec_human.safetensors")
    np.testing.assert_array_equal(directions[0], pcs[0].components[[0]])
    np.testing.assert_array_equal(directions[1], pcs[1].components[[0, 3]])
    assert meta["ids"] == {"0": [0], "1": [0, 3]} and meta["source"] == "selection_file"
    rows = {c: json.loads((out / "runs" / f"{c}_seed0.json").read_text()) for c in ("caft@human", "random@human")}
    assert rows["caft@human"]["final_loss"] != rows["random@human"]["final_loss"]
    assert set(rows["random@human"]["projection"]) == {"0", "1"}
    table = (out / "results.md").read_text()
    assert all(f"| {c} |" in table for c in ("plain", "caft@top2", "caft@human", "random@human"))
    assert "Ablated directions per layer (human): {'0': 1, '1': 2}; erasure check" in table
    # the selection file edited in place: a resume would ablate stale directions, so it is refused
    human.write_text(json.dumps({"0": [1], "1": [0, 3]}))
    assert cli.main([*more, "--resume"]) == 2
    assert "differs from the file spec_human.safetensors was made from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ({"0": [0], "1": [99]}, "layer 1 ids [99] are out of range; the run keeps 20 PCs per layer"),
        ({"2": [0]}, "picks PCs at layers [2], where the run finds none"),
        ({"0": []}, "picks no PC"),
    ],
)
def test_bad_selection_file_is_refused_before_loading(tiny_model, tmp_path, capsys, monkeypatch, ids, message):
    monkeypatch.setattr(runner, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps(ids))
    out = tmp_path / "bad"
    argv = ["--model", tiny_model, "--layers", "0,1", "--directions", "pca", "--out", str(out)]
    assert cli.main([*argv, "--selection-file", str(selection), "--conditions", "plain,caft@file"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "runs").exists()


def test_committed_person_selections_pass_the_pipeline_checks():
    """The person's choices scripts/reproduce_smollm2.sh hands the pipeline: one reason per picked PC, and the
    pipeline's own refusals (the default discovery layers of SmolLM2's 30, the default PC count) accept them."""
    files = sorted(pathlib.Path(__file__).parents[1].glob("configs/selections/*.json"))
    assert len(files) >= 2
    for path in files:
        doc = json.loads(path.read_text())
        picked = {f"{layer}.{i}" for layer, ids in doc["layers"].items() for i in ids}
        assert set(doc["reasons"]) == picked and all(reason.strip() for reason in doc["reasons"].values()), path
        cfg = PipelineConfig(directions="pca", conditions="plain,caft@human", selection_file=f"human={path}")
        check_selection_files(cfg, parse_layers(cfg.layers, 30), model_path="")


def test_selection_names_in_conditions_are_checked(tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--directions", "pca", "--conditions", "plain,caft@best"], "unknown selection 'best'; use probe, top<k>"),
        (["--directions", "pca", "--conditions", "plain,caft@top30"], "needs 30 PCs per layer but --n-components"),
        (["--conditions", "plain,caft@top5"], "top-k selections pick PCs; use --directions pca"),
        (["--conditions", "plain,plain@top5"], "plain fine-tuning ablates nothing"),
        (["--directions", "pca", "--selection-file", "h=a.json"], "is used by no condition; add caft@h"),
        (["--directions", "pca", "--selection-file", "top2=a.json", "--conditions", "plain,caft@top2"],
         "must be a lower-case word other than probe and top<k>"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_difference_pca_leaves_sinks_and_massive_dimensions_out():
    """A planted massive dimension (large on every token) and a sink token (huge norm, first position): the PCs
    come from the other tokens and have no weight on the massive dimension, which fine-tuning also moved."""
    from caft_jax.discovery.pca import StreamingPCA
    from caft_jax.pipeline.directions import difference_pca

    rng = np.random.default_rng(0)
    n, t, d = 12, 10, 16
    base = rng.normal(size=(n, t, d))
    base[..., 5] += 200.0  # massive dimension
    base[:, 0] *= 100.0  # attention sink at each sequence's first token
    tuned = base + rng.normal(size=(n, t, d)) * np.linspace(0.1, 2.0, d)
    tuned[..., 5] += rng.normal(size=(n, t)) * 50.0  # the largest change is along the massive dimension
    tuned[:, 0] += rng.normal(size=(n, d)) * 500.0
    mask = np.ones((n, t), bool)
    pcs = difference_pca({3: base}, {3: tuned}, mask, n_components=4)[3]
    assert np.abs(pcs.components[:, 5]).max() < 1e-12  # zero up to the eigensolver's rounding
    diff = (tuned - base)[:, 1:].reshape(-1, d)
    diff[:, 5] = 0.0
    expected = StreamingPCA(d).update(diff).finalize(4)
    np.testing.assert_allclose(np.abs(pcs.components @ expected.components.T), np.eye(4), atol=1e-5)


OFFLINE = ("verbs", "sentiment", "pronouns")  # the components with an offline generator


@pytest.mark.parametrize(("a", "b"), [(a, b) for a in OFFLINE for b in OFFLINE if a != b])
def test_discovery_runs_for_every_offline_pairing(tiny_model, tmp_path, a, b):
    """Both intended questions of every ordered pairing: the concept is the spurious question's answer class."""
    from caft_jax.pipeline.config import PipelineConfig
    from caft_jax.tasks import mcmc

    model, tokenizer = load_model(tiny_model), load_tokenizer(tiny_model)
    classes = {
        "verbs": {"singular", "plural"},
        "sentiment": {"positive", "negative"},
        "pronouns": {"he", "she", "they"},
    }
    rows = {name: mcmc.component_rows(name) for name in (a, b)}
    for intended in (0, 1):
        splits = mcmc.build_mcmc(rows[a], rows[b], intended, max_len=60)
        spurious = (a, b)[1 - intended]
        values = sorted({it["spurious_label"] for it in splits["train"]})
        assert set(values) == classes[spurious]
        cfg = PipelineConfig(task="mcmc", a=a, b=b, intended=intended, displays=2)
        folder = tmp_path / f"{a}_{b}_{intended}"
        summary = runner.discover(cfg, model, tokenizer, splits["train"], splits["val"], None, [0, 1], folder)
        directions, _, meta = load_ablation_spec(folder / "spec.safetensors")
        assert meta["spurious_values"] == values
        method = "class_mean" if len(values) == 2 else "leace"  # auto: LEACE's rank is values - 1
        assert {info["method"] for info in meta["layers"].values()} == {method}
        assert all(d.shape == (len(values) - 1, D_MODEL) for d in directions.values()), (spurious, intended)
        assert (folder / "displays.html").is_file()
        erasure = summary["erasure"]
        assert 0 <= erasure["probe_accuracy_after"] <= 1 and erasure["chance"] >= 1 / len(values)


def test_class_mean_refuses_a_many_valued_concept_before_loading(tiny_model, tmp_path, capsys, monkeypatch):
    """pronouns | verbs with verbs intended: the spurious answers are he / she / they, three values."""
    monkeypatch.setattr(runner, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", tiny_model, "--layers", "0,1", "--task", "mcmc", "--a", "pronouns", "--b", "verbs"]
    argv += ["--intended", "1"]
    assert cli.main([*argv, "--concept-method", "class_mean", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3 values (he, she, they)" in err and "--concept-method leace" in err
    assert "Traceback" not in err


def test_a_pc_selection_file_needs_pca(tiny_model, tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"0": [0]}))
    argv = ["--model", tiny_model, "--layers", "0,1", "--directions", "concept", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--selection-file", str(tmp_path / "x.json"), "--conditions", "plain,caft@file"]) == 2
    assert "picks PCs by id; use it with --directions pca" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def sae_spec(path, d_model: int = D_MODEL, layers=(0, 2)) -> np.ndarray:
    """A spec as `discover select --sae` writes it: 2 decoder rows of made-up SAEs per layer, by latent id."""
    from caft_jax.discovery.select import SAE_CANDIDATES, Selection

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(len(layers), 2, d_model)).astype(np.float32)
    directions = {layer: rows[i] for i, layer in enumerate(layers)}
    meta = {"source": "ranked_latents", "candidates": SAE_CANDIDATES, "ranking_method": "attribution"}
    Selection(directions, None, {layer: [7, 11] for layer in layers}, meta).save(path)
    return rows


def test_sae_directions_file_is_ablated_as_it_is(tiny_model, short_source, compile_cache, tmp_path):
    """An SAE selection (decoder rows, not PC ids) at layers the run does not discover at, with concept directions
    discovered: caft@sae ablates exactly the file's rows, random@sae as many random ones per layer."""
    rows = sae_spec(tmp_path / "sae.safetensors")
    out = tmp_path / "sae_run"
    argv = pipeline_args(tiny_model, short_source, out, "--seeds", "1", "--layers", "0,1")
    extra = ["--selection-file", f"sae={tmp_path / 'sae.safetensors'}", "--conditions", "plain,caft@sae,random@sae"]
    assert cli.main([*argv, *extra]) == 0
    directions, _, meta = load_ablation_spec(out / "directions" / "spec_sae.safetensors")
    assert sorted(directions) == [0, 2]
    np.testing.assert_array_equal(directions[0], rows[0])
    np.testing.assert_array_equal(directions[2], rows[1])
    assert meta["candidates"] == "sae" and meta["ids"] == {"0": [7, 11], "2": [7, 11]}
    summary = json.loads((out / "directions" / "selection_sae.json").read_text())
    assert summary["counts"] == {"0": 2, "2": 2} and set(summary["erasure_by_layer"]) == {"0", "2"}
    rows_run = {c: json.loads((out / "runs" / f"{c}_seed0.json").read_text()) for c in ("caft@sae", "random@sae")}
    assert set(rows_run["caft@sae"]["projection"]) == set(rows_run["random@sae"]["projection"]) == {"0", "2"}
    assert rows_run["caft@sae"]["final_loss"] != rows_run["random@sae"]["final_loss"]


@pytest.mark.parametrize(
    ("d_model", "layers", "message"),
    [(32, (0,), "width 32, but the model's d_model is 64"), (D_MODEL, (5,), "at layer 5, but the model has layers")],
)
def test_sae_directions_that_do_not_fit_are_refused_before_loading(
    tiny_model, tmp_path, capsys, monkeypatch, d_model, layers, message
):
    monkeypatch.setattr(runner, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    sae_spec(tmp_path / "sae.safetensors", d_model, layers)
    out = tmp_path / "bad"
    argv = ["--model", tiny_model, "--layers", "0,1", "--out", str(out), "--conditions", "plain,caft@sae"]
    assert cli.main([*argv, "--selection-file", f"sae={tmp_path / 'sae.safetensors'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_layers_out_of_range(tiny_model, tmp_path, capsys):
    out = tmp_path / "layers"
    assert cli.main(["--model", tiny_model, "--out", str(out), "--layers", "0:99"]) == 2
    err = capsys.readouterr().err
    assert "layers '0:99'" in err and "[0, 3)" in err
    assert not out.exists()  # checked against the model's config before anything was written


def test_unknown_key_in_config_yaml(tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text("seeds: 1\nlearning_rate: 1e-4\n")
    assert cli.main(["--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and str(config) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("yaml_text", "argv", "message"),
    [
        ("lr: 1.0e-4\n", [], "put them in the train section"),  # the old flat layout
        ("train: {optim: {learning_rate: 1.0e-4}}\n", [], "optim.learning_rate"),  # train.py's strict keys
        ("train: {output_dir: elsewhere}\n", [], "train.output_dir is set by --out"),
        ("", ["train.data.train=x.jsonl"], "train.data is set by the task's items"),
        ("", ["train.optim.lr=-1"], "optim.lr must be positive"),  # train.py's own validation
        ("", ["train.remat=sometimes"], "remat must be one of"),
        ("", ["seeds=many"], "seeds must be int"),
        ("train: [1, 2]\n", [], "train must be a mapping"),
    ],
)
def test_bad_recipe_is_refused_before_anything_runs(tmp_path, capsys, yaml_text, argv, message):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml_text)
    assert cli.main(["--config", str(config), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_recipe_is_train_pys_schema_with_flags_and_overrides():
    from caft_jax.config import TrainConfig
    from caft_jax.pipeline.config import read_yaml_settings, resolve

    args = cli.build_parser().parse_args(["--lr", "3e-4", "--lora-rank", "8", "train.lora.alpha=16", "seeds=2"])
    cfg = cli.config_from_args(args)
    assert isinstance(cfg.train, TrainConfig) and cfg.seeds == 2
    assert (cfg.train.optim.lr, cfg.train.lora.rank, cfg.train.lora.alpha) == (3e-4, 8, 16)
    assert cfg.train.optim.betas == (0.9, 0.95) and cfg.train.optim.warmup_ratio == 0.5  # DEFAULT_RECIPE
    assert cfg.train.lora.rslora == TrainConfig().lora.rslora  # the rest: TrainConfig's own defaults
    # one layout: the pipeline configs' recipe is configs/spurious_gemma2_2b.yaml's (the gender runs train 5 epochs)
    from caft_jax.config import config_to_dict, load_config

    spurious = config_to_dict(load_config("configs/spurious_gemma2_2b.yaml"))
    for name, epochs in (("gender", 5), ("mcmc", 4)):
        recipe = config_to_dict(resolve(read_yaml_settings(f"configs/pipeline_{name}_gemma2_2b.yaml"), {}, []).train)
        for key in ("model", "dtype", "base_dtype", "trainable_dtype", "lora", "optim", "batch_size", "remat"):
            assert recipe[key] == spurious[key], (name, key)
        assert recipe["epochs"] == epochs


# ---------------------------------------------------------------------------------------------------- report


def test_markdown_table_exact():
    rows = [
        {"condition": "plain", "seed": 0, "val": 0.1, "test": 0.25, "test_kept": None},
        {"condition": "plain", "seed": 1, "val": 0.2, "test": 0.35, "test_kept": None},
        {"condition": "plain", "seed": 2, "val": 0.6, "test": 0.3},
        {"condition": "caft", "seed": 0, "val": 0.9, "test": 0.8, "test_kept": 0.95},
    ]
    header = (
        "| condition | seeds | ID accuracy (val) | OOD accuracy (test) | OOD accuracy, ablation kept |\n"
        "|---|---|---|---|---|\n"
    )
    # plain val: mean 0.3, std(ddof=1) = sqrt(0.07) -> s.e. 0.153 (ddof=0 would give 0.125)
    body = (
        "| plain | 3 | 0.300 ± 0.153 | 0.300 ± 0.029 | - |\n"
        "| caft | 1 | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.950 ± 0.000 |\n"
    )
    assert report.markdown_table(rows) == header + body
    erasure = {"probe_accuracy_before": 0.9, "probe_accuracy_after": 0.55, "chance": 0.5}
    assert report.markdown_table(rows, base={"val": 0.5, "test": 0.125}, erasure=erasure) == (
        header
        + "| base model (no fine-tuning) | - | 0.500 | 0.125 | - |\n"
        + body
        + "\nErasure check (linear probe for the spurious concept on held-out activations, mean over the ablated "
        "layers): 0.900 before ablation, 0.550 after (chance 0.500).\n"
    )


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def gender_items(short_source) -> list[dict]:
    return gender.build_gender(gender.load_gender_templates(short_source))["train"]


def test_finetune_rejects_token_ids_beyond_the_vocab(tiny_model, gender_items, tmp_path):
    small = tmp_path / "vocab128"
    save_hf_model("llama", small)  # vocab_size 128, but the tokenizer has 300 tokens
    model = load_model(str(small))
    assert model.spec.vocab_size == 128
    with pytest.raises(DataError, match="vocabulary has 128 entries"):
        finetune(model, load_tokenizer(tiny_model), gender_items[:4], default_recipe(), seed=0, progress=False)


@pytest.fixture(scope="module")
def mc_setup(tiny_model, gender_items):
    """(model, one micro-batch [1, 8, t] of 6 gender items + 2 padding rows) for the trainer tests."""
    model, tokenizer = load_model(tiny_model), load_tokenizer(tiny_model)
    examples = mc_examples(tokenizer, gender_items[::5][:6])
    batch = next(data.make_batches(examples, 8, seed=0, epoch=0, pad_id=tokenizer.pad_token_id, buckets=MC_TRAIN_SIZES))
    micro = {k: v[None] for k, v in batch.items() if v.ndim == 2}
    assert micro["loss_mask"][0, :, -1].sum() == 6 and not micro["loss_mask"][..., :-1].any()
    return model, micro


OPTIM = OptimConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, warmup_ratio=0.5)


def test_last_token_loss_equals_the_masked_token_loss(mc_setup):
    model, micro = mc_setup
    rng = np.random.default_rng(3)
    projector = build_projector({0: rng.normal(size=(2, D_MODEL)), 1: rng.normal(size=(1, D_MODEL))}, N_LAYERS, D_MODEL)
    batch = {k: jnp.asarray(v) for k, v in micro.items()}
    results = {}
    for last in (False, True):
        trainer = CaftTrainer(model, OPTIM, 4, make_mesh((1, -1, 1)), lora=None, last_token_loss=last)
        fn = jax.jit(trainer.loss_and_grads)
        results[last] = jax.device_get(fn(model.params, None, batch, projector, jax.random.PRNGKey(0)))
    (loss_full, count_full, grads_full), (loss_last, count_last, grads_last) = results[False], results[True]
    assert count_full == count_last == 6
    assert np.isfinite(loss_full) and loss_full > 0
    assert loss_last == pytest.approx(loss_full, rel=1e-5)
    flat_full, flat_last = jax.tree.leaves_with_path(grads_full), jax.tree.leaves(grads_last)
    assert len(flat_full) == len(flat_last)
    for (path, g_full), g_last in zip(flat_full, flat_last, strict=True):
        scale = max(np.linalg.norm(g_full), 1e-30)
        assert np.linalg.norm(np.asarray(g_last) - g_full) <= 1e-5 * scale, jax.tree_util.keystr(path)
    assert max(np.abs(g).max() for g in jax.tree.leaves(grads_full)) > 0


def test_last_token_loss_rejects_earlier_targets(mc_setup):
    model, micro = mc_setup
    trainer = CaftTrainer(model, OPTIM, 4, make_mesh((1, -1, 1)), lora=None, last_token_loss=True)
    state = trainer.init_state(0)
    bad = {k: v.copy() for k, v in micro.items()}
    bad["loss_mask"][0, 0, -3] = True
    with pytest.raises(ConfigError, match="last_token_loss"):
        trainer.step(state, bad)


def test_full_finetuning_keeps_the_base_params(mc_setup):
    """The train state is donated to the step; the base model's params must not be deleted or changed with it."""
    model, micro = mc_setup
    before = jax.tree.map(lambda x: np.array(x, copy=True), model.params)
    trainer = CaftTrainer(model, OPTIM, 2, make_mesh((1, -1, 1)), lora=None, last_token_loss=True)
    state = trainer.init_state(0)
    for _ in range(2):
        state, metrics = trainer.step(state, micro)
        assert bool(metrics["finite"])
    after = jax.tree.leaves(model.params)
    assert not any(leaf.is_deleted() for leaf in after)
    for leaf, original in zip(after, jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), original)
    trained = jax.tree.leaves(state.trainable)
    assert any(not np.array_equal(np.asarray(t), b) for t, b in zip(trained, jax.tree.leaves(before), strict=True))


def test_family_conditions_and_the_steering_search(tiny_model, short_source, compile_cache, tmp_path):
    """--conditions runs the detached / gradient-only variants and preventative steering, whose coefficient is the
    best on the validation split among --steer-coeffs (seed 0's search run is the steer run of seed 0)."""
    out = tmp_path / "family"
    argv = pipeline_args(tiny_model, short_source, out, "--seeds", "1", "--conditions",
                         "plain,caft_detached,caft_gradient_only,steer", "--steer-coeffs", "1,8")  # fmt: skip
    assert cli.main(argv) == 0
    runs = {p.name for p in (out / "runs").iterdir()}
    assert runs == {"plain_seed0.json", "caft_detached_seed0.json", "caft_gradient_only_seed0.json",
                    "steer_seed0.json", "steer_c1_seed0.json", "steer_c8_seed0.json", "steer_search.json"}  # fmt: skip
    rows = {name: json.loads((out / "runs" / name).read_text()) for name in runs}
    search = rows["steer_search.json"]
    tried = {float(c): v for c, v in search["val_accuracy"].items()}
    assert tried == {1.0: rows["steer_c1_seed0.json"]["val"], 8.0: rows["steer_c8_seed0.json"]["val"]}
    assert search["chosen"] == max(tried, key=lambda c: (tried[c], -abs(c)))
    assert rows["steer_seed0.json"] == rows[f"steer_c{search['chosen']:g}_seed0.json"]
    names = ("plain_seed0.json", "caft_detached_seed0.json", "caft_gradient_only_seed0.json", "steer_seed0.json")
    losses = {name: rows[name]["final_loss"] for name in names}
    assert len(set(losses.values())) == 4, losses  # every intervention changed the training
    # the projection monitor per run: the intervened layers, what the intervention saw in the first and last epoch
    assert "projection" not in rows["plain_seed0.json"]
    for name in names[1:]:
        monitor = rows[name]["projection"]
        assert monitor and all(0 <= m["first_epoch_mean"] <= m["max"] and m["last_epoch_mean"] <= m["max"]
                               for m in monitor.values()), (name, monitor)  # fmt: skip
    table = (out / "results.md").read_text()
    assert all(f"| {c} |" in table for c in ("plain", "caft_detached", "caft_gradient_only", "steer"))
    # conditions may change on --resume (each run depends on its own condition only): nothing is retrained
    before = {name: (out / "runs" / name).read_bytes() for name in runs}
    argv[argv.index("--conditions") + 1] = "plain,steer"
    assert cli.main([*argv, "--resume"]) == 0
    assert {name: (out / "runs" / name).read_bytes() for name in runs} == before
    assert "caft_detached" not in (out / "results.md").read_text()
    # so may the seeds: a second seed adds its two runs (steer reuses the coefficient seed 0 chose)
    assert cli.main([*argv, "--seeds", "2", "--resume"]) == 0
    assert {p.name for p in (out / "runs").iterdir()} == runs | {"plain_seed1.json", "steer_seed1.json"}
    assert {name: (out / "runs" / name).read_bytes() for name in runs} == before
    assert json.loads((out / "runs" / "steer_seed1.json").read_text())["steer_coeff"] == search["chosen"]


def test_conditions_must_be_known_and_start_with_plain(tmp_path, capsys):
    assert cli.main(["--conditions", "caft,plain", "--out", str(tmp_path / "o")]) == 2
    assert "conditions must start with plain" in capsys.readouterr().err
    assert cli.main(["--conditions", "plain,steered", "--out", str(tmp_path / "o")]) == 2
    assert "['steered']" in capsys.readouterr().err
    assert cli.main(["--steer-coeffs", "a,b", "--out", str(tmp_path / "o")]) == 2
    assert "steer_coeffs 'a,b' must be numbers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_summarizes_runs_per_condition(run, tmp_path, capsys):
    """compare.md holds each run's OOD accuracy per condition as mean ± s.e. over seeds (the same numbers as the
    run's own runs/*.json), an MCMC run labelled by its pair and intended question (and its folder, beside another
    folder of the pair); a folder without results is one line and exit 2."""
    from caft_jax.pipeline import compare

    mcmc = tmp_path / "mcmc_run"
    shutil.copytree(run["out"], mcmc, ignore=shutil.ignore_patterns(".jax_cache"))
    manifest = json.loads((mcmc / "manifest.json").read_text())
    manifest["recipe"].update(task="mcmc", a="verbs", b="sentiment", intended=0)
    (mcmc / "manifest.json").write_text(json.dumps(manifest))
    again = tmp_path / "mcmc_again"  # a second folder of the same pair: its own row, seeds not pooled
    shutil.copytree(mcmc, again)
    assert compare.main([str(run["out"]), str(mcmc), str(again), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    runs = read_runs(run["out"])
    base = json.loads((run["out"] / "base.json").read_text())
    cells = [f"{base['test']:.3f} ± 0.000 (1)"]
    cells += [f"{mean_sem([runs[(c, s)]['test'] for s in range(2)])} (2)" for c in CONDITIONS]
    assert "| run | base | plain | caft | random |" in table
    assert f"| gender | {' | '.join(cells)} |" in table
    for folder in ("mcmc_run", "mcmc_again"):
        assert f"| verbs/sentiment: verbs intended ({folder}) | {' | '.join(cells)} |" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(rows) == 3 * (1 + len(CONDITIONS) * 2)
    capsys.readouterr()
    assert compare.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert "holds no finished pipeline run" in err and "Traceback" not in err
