"""`python -m caft_jax.tasks`: write task datasets as JSONL files for train.py / eval.py.

    python -m caft_jax.tasks mcmc --a verbs --b sentiment --intended 1 [--source-a PATH] [--source-b PATH] \\
        [--offline] --out DIR
    python -m caft_jax.tasks em --data insecure.jsonl [--val-size 1000] [--questions DIR] --out DIR
    python -m caft_jax.tasks list

mcmc writes DIR/{train,val,test}.jsonl (items as in caft_jax.tasks.mcmc) and DIR/task.json (settings and sizes);
a component comes from --source-a/--source-b when given, else from an offline generator with --offline, else from
the Hugging Face hub. em writes DIR/{train,val}.jsonl and DIR/task.json. list prints the paper's 16 combinations.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from caft_jax.cli.handler import guarded
from caft_jax.errors import ConfigError
from caft_jax.jsonio import write_jsonl
from caft_jax.tasks import gender, mcmc
from caft_jax.tasks.em import question_files, split_chat_jsonl


def _write_task(out: Path, splits: dict[str, list[dict]], info: dict) -> None:
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", records)
    info = {**info, "sizes": {name: len(records) for name, records in splits.items()}}
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    sizes = ", ".join(f"{name} {len(records)}" for name, records in splits.items())
    print(f"wrote {sizes} to {out}")


# ---------------------------------------------------------------------------------------------------- mcmc


def add_mcmc_parser(subparsers) -> None:
    p = subparsers.add_parser("mcmc", help="double multiple-choice spurious-correlation task (caft_method.md 3.2)")
    p.add_argument("--a", required=True, choices=mcmc.COMPONENTS, help="first question's component dataset")
    p.add_argument("--b", required=True, choices=mcmc.COMPONENTS, help="second question's component dataset")
    p.add_argument("--intended", required=True, type=int, choices=(0, 1), help="0: question a, 1: question b")
    p.add_argument("--source-a", help="local .csv/.jsonl or hub id for --a (default: its hub dataset)")
    p.add_argument("--source-b", help="local .csv/.jsonl or hub id for --b (default: its hub dataset)")
    p.add_argument("--offline", action="store_true", help="use the offline generators for components without --source")
    p.add_argument("--generator-seed", type=int, default=0, help="seed of the offline generators")
    p.add_argument("--seed", type=int, default=42, help="permutation and A/B-swap seed (paper: 42)")
    p.add_argument("--max-len", type=int, default=2000, help="at most this many question pairs")
    p.add_argument("--train-frac", type=float, default=0.7)
    p.add_argument("--val-frac", type=float, default=0.5, help="share of the non-train pairs that go to val")
    p.add_argument("--train-ambiguous-frac", type=float, default=1.0, help="also used for val")
    p.add_argument("--test-ambiguous-frac", type=float, default=0.0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_mcmc)


def run_mcmc(args: argparse.Namespace) -> int:
    if args.a == args.b:
        raise ConfigError(f"--a and --b are both {args.a}; pair two different components.")
    rows_a = mcmc.component_rows(
        args.a, args.source_a, offline=args.offline, generator_seed=args.generator_seed, flag="--source-a"
    )
    rows_b = mcmc.component_rows(
        args.b, args.source_b, offline=args.offline, generator_seed=args.generator_seed, flag="--source-b"
    )
    settings = {
        "max_len": args.max_len,
        "train_frac": args.train_frac,
        "val_frac": args.val_frac,
        "train_ambiguous_frac": args.train_ambiguous_frac,
        "test_ambiguous_frac": args.test_ambiguous_frac,
        "seed": args.seed,
    }
    splits = mcmc.build_mcmc(rows_a, rows_b, args.intended, **settings)
    info = {
        "task": "mcmc",
        "a": args.a,
        "b": args.b,
        "intended": args.intended,
        "intended_question": (args.a, args.b)[args.intended],
        "in_paper_figure": (args.a, args.b, args.intended) in mcmc.COMBINATIONS,
        "sources": {
            side: source or (f"offline generator (seed {args.generator_seed})" if args.offline else mcmc.HUB_IDS[name])
            for side, name, source in (("a", args.a, args.source_a), ("b", args.b, args.source_b))
        },
        "settings": settings,
    }
    _write_task(Path(args.out), splits, info)
    return 0


# ---------------------------------------------------------------------------------------------------- em


def add_em_parser(subparsers) -> None:
    p = subparsers.add_parser("em", help="emergent misalignment: train/val split of a chat JSONL (caft_method.md 3.1)")
    p.add_argument("--data", required=True, help="chat JSONL such as insecure.jsonl")
    p.add_argument("--val-size", type=int, default=1000, help="held-out records for the insecure-code eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", help="folder with first_plot_questions.yaml and judge prompts, checked and recorded")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_em)


def run_em(args: argparse.Namespace) -> int:
    questions = question_files(args.questions) if args.questions else {}
    train, val = split_chat_jsonl(args.data, val_size=args.val_size, seed=args.seed)
    info = {
        "task": "em",
        "data": os.path.abspath(args.data),
        "val_size": args.val_size,
        "seed": args.seed,
        "question_files": {stem: str(path.resolve()) for stem, path in questions.items()},
    }
    _write_task(Path(args.out), {"train": train, "val": val}, info)
    return 0


# ---------------------------------------------------------------------------------------------------- gender


def add_gender_parser(subparsers) -> None:
    p = subparsers.add_parser("gender", help="pronoun case vs gender-profession stereotype (caft_method.md 3.3)")
    p.add_argument("--source", help=f"local CSV/JSONL of templates (text, category) or hub id (e.g. {gender.HUB_ID})")
    p.add_argument("--offline", action="store_true", help="use this project's offline templates (the default)")
    p.add_argument("--seed", type=int, default=42, help="option-shuffle seed (paper: 42)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_gender)


def run_gender(args: argparse.Namespace) -> int:
    templates = gender.templates_from(args.source)
    splits = gender.build_gender(templates, seed=args.seed)
    info = {"task": "gender", "source": args.source or "offline templates", "seed": args.seed}
    _write_task(Path(args.out), splits, info)
    return 0


# ---------------------------------------------------------------------------------------------------- list


def add_list_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="print the 16 MCMC combinations of the paper figure")
    p.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    print(f"{'#':>2}  {'a':<10} {'b':<10} intended")
    for i, (a, b, intended) in enumerate(mcmc.COMBINATIONS, 1):
        print(f"{i:>2}  {a:<10} {b:<10} {intended} ({(a, b)[intended]})")
    return 0


# ---------------------------------------------------------------------------------------------------- main


def build_parser(prog: str = "python -m caft_jax.tasks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    # One add_*_parser per task; each sets args.func.
    add_mcmc_parser(subparsers)
    add_gender_parser(subparsers)
    add_em_parser(subparsers)
    add_list_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m caft_jax.tasks") -> int:
    args = build_parser(prog).parse_args(argv)
    return guarded(lambda: args.func(args))
