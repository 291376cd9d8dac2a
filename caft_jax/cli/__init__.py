"""Command-line entry points (train.py and eval.py at the repository root are thin wrappers)."""
