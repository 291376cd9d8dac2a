"""`python -m caft_jax.discover ...`: see caft_jax/discovery/cli.py."""

import sys

from caft_jax.discovery.cli import main

if __name__ == "__main__":
    sys.exit(main())
