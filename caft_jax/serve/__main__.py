import sys

from caft_jax.serve.cli import main

sys.exit(main(prog="python -m caft_jax.serve"))
