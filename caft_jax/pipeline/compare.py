"""``python -m caft_jax.pipeline.compare RUN... --out DIR``: the summary over pipeline runs, as the paper's MCMC
figure: accuracy on the intended question out of distribution (test split), one group per run (a task or an MCMC
pair and its intended question), one bar per condition, mean ± standard error over seeds, the base model's
accuracy beside them. Writes DIR/compare.md (the same numbers as a table), compare.csv/json (one row per run, seed
and condition) and compare.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from caft_jax.cli.handler import guarded
from caft_jax.errors import ConfigError
from caft_jax.jsonio import read_json
from caft_jax.plots import plot_conditions, summarize, write_results


def run_label(experiment: dict) -> str:
    """ "gender", or an MCMC pair as "verbs/sentiment: sentiment intended" (no "|": it would split a markdown cell)."""
    if experiment.get("task") != "mcmc":
        return str(experiment.get("task"))
    a, b = experiment["a"], experiment["b"]
    return f"{a}/{b}: {(a, b)[int(experiment['intended'])]} intended"


def comparison_rows(run_dirs: Sequence[str | pathlib.Path]) -> list[dict]:
    """One row per run folder, seed and condition ({"run", "condition", "seed", "accuracy" (test), "val"}), the
    base model as condition "base". Folders of the same task or pair (e.g. PCA and concept directions) are told
    apart by their folder names, so their seeds are never pooled."""
    folders, recipes = [pathlib.Path(d) for d in run_dirs], []
    for folder in folders:
        manifest, results = read_json(folder / "manifest.json"), read_json(folder / "results.json")
        if manifest is None or results is None:
            raise ConfigError(
                f"{folder} holds no finished pipeline run (manifest.json and results.json); run "
                "`python -m caft_jax.pipeline` there first, or --resume it."
            )
        recipes.append((manifest["recipe"], results))
    labels = [run_label(recipe) for recipe, _ in recipes]
    rows = []
    for folder, label, (_, results) in zip(folders, labels, recipes, strict=True):
        if labels.count(label) > 1:
            label = f"{label} ({folder.name})"
        base = read_json(folder / "base.json")
        if base is not None:
            rows.append({"run": label, "condition": "base", "seed": None, "accuracy": base["test"], "val": base["val"]})
        rows += [
            {"run": label, "condition": r["condition"], "seed": r["seed"], "accuracy": r["test"], "val": r["val"]}
            for r in results
        ]
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """Runs as rows, conditions as columns: OOD accuracy mean ± s.e. (seeds)."""
    stats = summarize(rows, "accuracy", by=("run", "condition"))
    runs = list(dict.fromkeys(s["run"] for s in stats))
    conditions = list(dict.fromkeys(s["condition"] for s in stats))
    cell = {(s["run"], s["condition"]): s for s in stats}
    lines = ["| run | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for run in runs:
        cells = []
        for condition in conditions:
            s = cell.get((run, condition))
            cells.append("-" if s is None else f"{s['mean']:.3f} ± {s['sem']:.3f} ({s['n_seeds']})")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(run_dirs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    rows = comparison_rows(run_dirs)
    out = pathlib.Path(out_dir)
    json_path, csv_path = write_results(rows, out, "compare")
    md = out / "compare.md"
    md.write_text("# OOD accuracy on the intended question (test split), mean ± s.e. (seeds)\n\n" + markdown(rows))
    long_rows = [{"condition": r["run"], "split": r["condition"], "seed": r["seed"], "accuracy": r["accuracy"]}
                 for r in rows]  # fmt: skip
    png = plot_conditions(long_rows, out / "compare.png", title="OOD accuracy on the intended question",
                          legend_title="condition")  # fmt: skip
    return {"markdown": md, "csv": csv_path, "json": json_path, "plot": png}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caft_jax.pipeline.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="+", help="pipeline run folders (their --out)")
    p.add_argument("--out", required=True, help="folder for compare.md/.csv/.json/.png")
    args = p.parse_args(argv)

    def run() -> int:
        paths = write_comparison(args.runs, args.out)
        print(paths["markdown"].read_text())
        print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['plot']}")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
