"""Entry point of `python -m caft_jax.tasks` (see caft_jax.tasks.cli)."""

import sys

from caft_jax.tasks.cli import main

sys.exit(main())
