"""Evaluation command line for caft_jax.

python eval.py logits --model PATH [--prompt TEXT] [--chat]   top next tokens: is the model loaded right?
"""

from __future__ import annotations

import argparse
import sys

from caft_jax.errors import CaftError


def main(argv: list[str] | None = None) -> int:
    from caft_jax.cli import logits

    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    logits.add_arguments(sub.add_parser("logits", help="print the most likely next tokens for a prompt"))
    args = parser.parse_args(argv)
    try:
        return {"logits": logits.run}[args.command](args)
    except CaftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
