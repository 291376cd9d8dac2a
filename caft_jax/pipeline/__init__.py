"""The whole CAFT method for a multiple-choice task in one command: plain fine-tune, discovery, selection, CAFT,
random baseline, OOD evaluation over seeds (``python -m caft_jax.pipeline``; see caft_jax/pipeline/cli.py)."""
