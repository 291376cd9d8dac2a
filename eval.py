"""Evaluation: `python eval.py logits|generate|mc|em|code ...` (the same as `caft eval ...`).

See caft_jax/cli/evaluate.py.
"""

import sys

from caft_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
