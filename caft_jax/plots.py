"""Result files and comparison plots shared by the ``eval.py`` subcommands.

A *row* is a flat dict of one measurement, e.g. ``{"condition": "test_time_ablation", "split": "test",
"seed": 1, "accuracy": 0.71, "n": 150}``. Rows that share a condition (and split) but differ in seed are
replicates: the plot shows their mean with the standard error of the mean as the error bar, as the paper's
figures do (caft_method.md section 3.2: mean +- s.e. over 5 seeds).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np


def summarize(rows: Sequence[dict], metric: str = "accuracy", by: Sequence[str] = ("condition", "split")) -> list[dict]:
    """Mean, standard error and count of ``metric`` over the rows sharing the ``by`` fields (in first-seen order).

    Rows where the metric is missing or None are skipped. The standard error is std(ddof=1) / sqrt(n), 0 for n = 1.
    """
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        groups.setdefault(tuple(row.get(k) for k in by), []).append(float(value))
    out = []
    for key, values in groups.items():
        n = len(values)
        sem = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        out.append({**dict(zip(by, key, strict=True)), "mean": float(np.mean(values)), "sem": sem, "n_seeds": n})
    return out


def plot_conditions(
    rows: Sequence[dict],
    out_png: str | os.PathLike,
    metric: str = "accuracy",
    title: str | None = None,
    legend_title: str = "split",
) -> pathlib.Path:
    """Bar chart of the mean ``metric`` per condition with standard-error bars over seeds; one bar colour per split.

    Args:
      rows: result rows with "condition", optionally "split" and "seed", and the metric.
      out_png: the image to write (parent directories are created).
      metric: the row field to plot.
      legend_title: what the colours ("split" field) stand for.
    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    summary = summarize(rows, metric)
    conditions = list(dict.fromkeys(s["condition"] for s in summary))
    splits = list(dict.fromkeys(s["split"] for s in summary))
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(conditions) * max(1, len(splits) / 2)), 3.6))
    for j, split in enumerate(splits):
        cells = {s["condition"]: s for s in summary if s["split"] == split}
        xs = [i + (j - (len(splits) - 1) / 2) * width for i, c in enumerate(conditions) if c in cells]
        means = [cells[c]["mean"] for c in conditions if c in cells]
        sems = [cells[c]["sem"] for c in conditions if c in cells]
        label = None if split is None else str(split)
        ax.bar(xs, means, width, yerr=sems, capsize=4, label=label)
    long_labels = max(len(str(c)) for c in conditions) > 14  # e.g. MCMC pairs: slanted so neighbours do not overlap
    ax.set_xticks(range(len(conditions)), [str(c) for c in conditions], rotation=20 if long_labels else 0,
                  ha="right" if long_labels else "center")  # fmt: skip
    ax.set_ylabel(metric.replace("_", " "))
    if metric.endswith("accuracy"):
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance for two options
    if len(splits) > 1 or splits[0] is not None:
        ax.legend(title=legend_title, fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``rows`` to ``out_dir/name.json`` (a list of objects) and ``out_dir/name.csv`` (union of the keys).

    Returns (json path, csv path). Nested values are written to the CSV as JSON strings.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    json_path.write_text(json.dumps(list(rows), indent=2) + "\n")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return json_path, csv_path
