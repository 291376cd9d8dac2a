"""Evaluation commands (`caft eval ...`, `python eval.py ...`).

  logits   --model PATH [--prompt TEXT] [--chat]                                 top next tokens (is it loaded right?)
  generate --model PATH [--adapter DIR] [--ablate SPEC] --prompt TEXT ...        sampled / greedy text
  mc       --model PATH [--adapter DIR] [--ablate SPEC] --data JSONL             multiple-choice accuracy
  em       --model PATH [--adapter DIR] --questions YAML ...                     emergent misalignment
  code     --model PATH [--adapter DIR] --prompts JSONL ...                      insecure-code rate
  judge    --labels JSONL --judge-prompts YAML ...                                the judge against hand labels

Run `... COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib

from caft_jax.cli.handler import guarded

COMMANDS = {
    "logits": "print the most likely next tokens for a prompt",
    "generate": "generate text (KV cache, greedy / temperature / top-p), optionally under test-time ablation",
    "mc": "multiple-choice accuracy and flipped accuracy, with and without the projector",
    "em": "emergent misalignment: sample answers to the question YAML and judge them with an LLM",
    "code": "in-distribution insecure-code rate judged by an LLM",
    "judge": "how well a judge separates hand-labelled aligned and misaligned answers",
}


def main(argv: list[str] | None = None, prog: str = "eval.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, help_text in COMMANDS.items():
        modules[name] = importlib.import_module(f"caft_jax.cli.{name}")
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return guarded(lambda: modules[args.command].run(args))
