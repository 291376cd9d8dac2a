"""Left padding and length buckets: the one place that decides how sequences become fixed-shape arrays.

Every batch the forward sees is left-padded (real tokens end at the last column, so the last position is the last
token for every row) to a length from a short list of buckets, so jit compiles a few shapes instead of one per
length. Each use picks its table of sizes; lengths past a table's end either fail (training: the data was meant to
fit) or round up to the next power of two (generation and scoring: any prompt must be served).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caft_jax.errors import DataError

# Training rows: the chat recipes' max_len values are all in this table.
TRAIN_SIZES = (64, 128, 256, 512, 1024, 2048)
# Multiple-choice training rows are ~30-60 tokens: finer steps than training's default halve the padding.
MC_TRAIN_SIZES = (32, 40, 48, 56, 64, 80, 96, 128, 192, 256, 384, 512)
# Generation prompts: tiny prompts share one program instead of compiling per length, then powers of two.
MIN_PROMPT = 16
# Scoring passes (no decode room needed): multiples of 8 up to 128, then powers of two; a power of two would pad
# a 40-token multiple-choice prompt to 64, 60% more work.
SCORE_SIZES = tuple(range(8, 129, 8))


class Bucketer:
    """Rounds a sequence length up to the smallest of a few fixed sizes.

    Args:
      sizes: distinct positive increasing lengths.
      grow: past the largest size, round up to the next power of two instead of raising DataError.
    """

    def __init__(self, sizes: Sequence[int] = TRAIN_SIZES, *, grow: bool = False):
        sizes = tuple(int(s) for s in sizes)
        if not sizes or sizes[0] <= 0 or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"bucket sizes must be distinct positive increasing ints, got {sizes!r}")
        self.sizes = sizes
        self.grow = grow

    def length_for(self, n: int) -> int:
        """Smallest bucket >= n (a power of two past the table when ``grow``); DataError past the table otherwise."""
        for size in self.sizes:
            if size >= n:
                return size
        if self.grow:
            return 1 << (int(n) - 1).bit_length()
        raise DataError(
            f"an example of {n} tokens is longer than the largest bucket ({self.sizes[-1]}); tokenise with "
            f"max_len <= {self.sizes[-1]} or add a larger bucket."
        )


PROMPT_BUCKETS = Bucketer((MIN_PROMPT,), grow=True)
SCORE_BUCKETS = Bucketer(SCORE_SIZES, grow=True)


def left_pad(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists into tokens [rows, length] int32 and attn_mask [rows, length] bool (extra rows empty)."""
    if rows < len(seqs) or any(len(ids) > length for ids in seqs):
        raise ValueError(f"{len(seqs)} sequences (longest {max(map(len, seqs), default=0)}) into [{rows}, {length}]")
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for r, ids in enumerate(seqs):
        if len(ids):
            tokens[r, length - len(ids) :] = ids
            mask[r, length - len(ids) :] = True
    return tokens, mask
