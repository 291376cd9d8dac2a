"""CAFT fine-tuning: `python train.py --config configs/X.yaml [key=value ...] [--resume]` (= `caft train`).

See caft_jax/cli/train.py.
"""

import sys

from caft_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
