"""Evaluation command line for caft_jax.

  python eval.py logits   --model PATH [--prompt TEXT] [--chat]           top next tokens: is the model loaded right?
  python eval.py generate --model PATH [--adapter DIR] [--ablate SPEC] --prompt TEXT ...   sampled / greedy text
  python eval.py mc       --model PATH [--adapter DIR] [--ablate SPEC] --data JSONL        multiple-choice accuracy
  python eval.py em       --model PATH [--adapter DIR] --questions YAML ...                emergent misalignment
  python eval.py code     --model PATH [--adapter DIR] --prompts JSONL ...                 insecure-code rate

Run `python eval.py COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from caft_jax.errors import CaftError

COMMANDS = {
    "logits": "print the most likely next tokens for a prompt",
    "generate": "generate text (KV cache, greedy / temperature / top-p), optionally under test-time ablation",
    "mc": "multiple-choice accuracy and flipped accuracy, with and without the projector",
    "em": "emergent misalignment: sample answers to the question YAML and judge them with an LLM",
    "code": "in-distribution insecure-code rate judged by an LLM",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, help_text in COMMANDS.items():
        modules[name] = importlib.import_module(f"caft_jax.cli.{name}")
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except CaftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
