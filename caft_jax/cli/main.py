"""`caft`: the one command-line face of caft_jax.

  caft train     --config configs/X.yaml [key=value ...] [--resume | --overwrite]   CAFT fine-tuning
  caft eval      logits | generate | mc | em | code ...                             evaluation
  caft discover  capture | pca | sae | display | select | check ...                 concept directions
  caft tasks     gender | mcmc | em ...                                             task data (JSONL)
  caft pipeline  [--quick] [--task gender|mcmc] ...                                 the whole method, resumable
  caft serve     --model M [--adapter DIR] [--ablate SPEC] [--port 8000]             OpenAI-compatible server
  caft lm-eval   --model caft_jax --model_args pretrained=M,adapter=DIR --tasks T     lm-evaluation-harness
  caft aot       --config X.yaml --topology v5e:2x4                                 TPU compile report

`caft COMMAND --help` shows each command's options. `python train.py`, `python eval.py` and `python -m
caft_jax.{pipeline,discover,tasks,serve,aot}` are the same commands.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, one-line description)
COMMANDS = {
    "train": ("caft_jax.cli.train", "CAFT fine-tuning (LoRA or full) from a YAML recipe"),
    "eval": ("caft_jax.cli.evaluate", "evaluation: logits, generate, mc, em, code"),
    "discover": ("caft_jax.discovery.cli", "concept directions: capture, PCA, SAE, displays, selection"),
    "tasks": ("caft_jax.tasks.cli", "build task data: gender, double multiple choice, EM splits"),
    "pipeline": ("caft_jax.pipeline.cli", "the whole method on a multiple-choice task, resumable"),
    "serve": ("caft_jax.serve.cli", "OpenAI-compatible HTTP server: base model, adapters, test-time ablation"),
    "lm-eval": ("caft_jax.harness", "lm-evaluation-harness with the caft_jax model type (adapters, interventions)"),
    "aot": ("caft_jax.aot", "ahead-of-time compile report of the sharded train step for a TPU topology"),
}

# modules of optional extras -> what installs them
OPTIONAL = {"lm_eval": "caft_jax[harness]"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: caft COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n`caft COMMAND --help` for options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}.\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL:
            raise
        print(f"error: caft {name} needs {e.name}; install it with pip install '{OPTIONAL[e.name]}'.", file=sys.stderr)
        return 2
    return module.main(rest, prog=f"caft {name}")


if __name__ == "__main__":
    sys.exit(main())
