"""The pipeline's results table (markdown + CSV) and plot: in-distribution and OOD accuracy per condition, mean and
standard error over seeds, with the CAFT-specific columns (OOD accuracy with the ablation kept, erasure check)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from caft_jax.plots import plot_conditions, summarize, write_results

# Columns of the summary, in order: (row field, header).
METRICS = (
    ("val", "ID accuracy (val)"),
    ("test", "OOD accuracy (test)"),
    ("test_kept", "OOD accuracy, ablation kept"),
)


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['sem']:.3f}"


def summary_rows(rows: Sequence[dict]) -> list[dict]:
    """One dict per condition: mean/s.e./n of each metric over seeds, in first-seen condition order."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    out = []
    for condition in conditions:
        mine = [r for r in rows if r["condition"] == condition]
        entry = {"condition": condition, "n_seeds": len(mine)}
        for field, _ in METRICS:
            stats = summarize(mine, field, by=("condition",))
            entry[field] = stats[0] if stats else None
        out.append(entry)
    return out


def markdown_table(rows: Sequence[dict], *, base: dict | None = None, erasure: dict | None = None) -> str:
    """The results table as markdown. ``base``: the untrained model's {"val", "test"}; ``erasure``: the spec's
    probe check {"probe_accuracy_before", "probe_accuracy_after", "chance"} (mean over ablated layers)."""
    header = ["condition", "seeds"] + [h for _, h in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if base is not None:
        lines.append(f"| base model (no fine-tuning) | - | {base['val']:.3f} | {base['test']:.3f} | - |")
    for entry in summary_rows(rows):
        cells = [entry["condition"], str(entry["n_seeds"])] + [_cell(entry[f]) for f, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if erasure:
        text += (
            f"\nErasure check (linear probe for the spurious concept on held-out activations, mean over the ablated "
            f"layers): {erasure['probe_accuracy_before']:.3f} before ablation, {erasure['probe_accuracy_after']:.3f} "
            f"after (chance {erasure['chance']:.3f}).\n"
        )
    return text


def write_report(
    rows: Sequence[dict],
    out_dir: str | pathlib.Path,
    *,
    title: str,
    base: dict | None = None,
    erasure: dict | None = None,
    notes: str = "",
) -> dict[str, pathlib.Path]:
    """Write results.md, results.csv/json (one row per run) and results.png (OOD and ID accuracy per condition)."""
    out = pathlib.Path(out_dir)
    json_path, csv_path = write_results(list(rows), out, "results")
    md = out / "results.md"
    md.write_text(
        f"# {title}\n\n" + markdown_table(rows, base=base, erasure=erasure) + (f"\n{notes}\n" if notes else "")
    )
    long_rows = [
        {"condition": r["condition"], "seed": r["seed"], "split": split, "accuracy": r[field]}
        for r in rows
        for field, split in (("val", "ID (val)"), ("test", "OOD (test)"))
        if r.get(field) is not None
    ]
    png = plot_conditions(long_rows, out / "results.png", title=title)
    return {"markdown": md, "csv": csv_path, "json": json_path, "plot": png}
