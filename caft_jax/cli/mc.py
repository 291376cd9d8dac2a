"""`eval.py mc`: multiple-choice accuracy per split, with and without test-time ablation.

    python eval.py mc --model DIR [--adapter DIR [DIR ...]] [--ablate SPEC] --data test.jsonl --out-dir results/

The data file holds one {"prompt", "target": " A", "other": " B" (optional), "split" (optional)} per line.
Several adapters are replicates (e.g. one per training seed): their rows carry "seed" = their position and the
plot shows mean +- standard error over them. Writes OUT_DIR/mc_results.{json,csv}, OUT_DIR/mc_predictions.{json,csv}
and, when there are several conditions (--ablate) or several adapters, OUT_DIR/mc_accuracy.png and
OUT_DIR/mc_flipped_accuracy.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from caft_jax.cli.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several_adapters=True)
    parser.add_argument("--data", required=True, help="MC JSONL file: prompt, target, other?, split?")
    parser.add_argument("--split", nargs="+", default=None, help="evaluate only items of these splits")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per jitted batch")
    parser.add_argument("--out-dir", default="mc_results", help="directory for the JSON, CSV and PNG files")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out-dir")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


# What a run writes into --out-dir (the PNGs only for several conditions); an earlier run's are kept unless --overwrite.
OUTPUTS = tuple(f"{name}.{ext}" for name in ("mc_results", "mc_predictions") for ext in ("json", "csv")) + (
    "mc_accuracy.png",
    "mc_flipped_accuracy.png",
)


def load_items(path: str, splits: list[str] | None) -> list[dict]:
    """MC records of ``path``, restricted to ``splits`` when given (DataError when nothing is left)."""
    from caft_jax.data import load_mc_jsonl
    from caft_jax.errors import DataError

    items = load_mc_jsonl(path)
    if splits:
        items = [item for item in items if str(item.get("split", "all")) in splits]
        if not items:
            raise DataError(f"{path} has no items in split(s) {', '.join(splits)}; check the 'split' field values.")
    return items


def run(args: argparse.Namespace) -> int:
    from caft_jax.cli.common import load_adapter, load_for_eval
    from caft_jax.evaluate_mc import evaluate_conditions
    from caft_jax.plots import plot_conditions, write_results
    from caft_jax.rundir import claim_files

    items = load_items(args.data, args.split)
    claim_files(pathlib.Path(args.out_dir), OUTPUTS, overwrite=args.overwrite)
    model, tokenizer, _, _, projector = load_for_eval(
        args.model, None, args.ablate, args.dtype, site=args.ablate_site, mean_ablation=not args.no_mean_ablation
    )
    adapters = args.adapter or [None]
    rows, predictions = [], []
    for seed, adapter in enumerate(adapters):
        lora, lora_settings = load_adapter(adapter, model) if adapter is not None else (None, None)
        extra = {"seed": seed, "model": str(args.model), "adapter": adapter, "ablate": args.ablate}
        r, p = evaluate_conditions(
            model,
            tokenizer,
            items,
            lora=lora,
            lora_settings=lora_settings,
            projector=projector,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            extra=extra,
        )
        rows += r
        predictions += p
    write_results(rows, args.out_dir, "mc_results")
    write_results(predictions, args.out_dir, "mc_predictions")
    if projector is not None or len(adapters) > 1:
        plot_conditions(rows, f"{args.out_dir}/mc_accuracy.png", metric="accuracy")
        if any(row["flipped_accuracy"] is not None for row in rows):  # the intended question may be the second one
            plot_conditions(rows, f"{args.out_dir}/mc_flipped_accuracy.png", metric="flipped_accuracy")
    for row in rows:
        flipped = "-" if row["flipped_accuracy"] is None else f"{row['flipped_accuracy']:.3f}"
        print(
            f"seed {row['seed']}  {row['condition']:<18} {row['split']:<10} n={row['n']:<5} "
            f"accuracy={row['accuracy']:.3f}  flipped={flipped}"
        )
    print(f"results in {args.out_dir}", file=sys.stderr)
    return 0
