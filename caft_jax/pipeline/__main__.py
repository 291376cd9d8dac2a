"""Entry point: python -m caft_jax.pipeline."""

import sys

from caft_jax.pipeline.cli import main

sys.exit(main())
