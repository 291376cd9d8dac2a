"""BatchTopK's selection of the k*B largest activations: bit-pattern bisection (caft_jax) against a sort, and both
against the SAE step's two matmuls, in one process with the variants interleaved (A B C A B C ...).

    python benchmarks/sae_topk.py [--batch 2048] [--dict-size 4096] [--d 576] [--k 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.discovery.sae_train import batch_topk_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dict-size", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    post = jnp.asarray(np.maximum(rng.normal(size=(args.batch, args.dict_size)), 0), jnp.float32)
    x = jnp.asarray(rng.normal(size=(args.batch, args.d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(args.d, args.dict_size)), jnp.float32)
    n_keep = args.k * args.batch

    bisection = jax.jit(lambda p: batch_topk_mask(p, n_keep))

    @jax.jit
    def by_sort(p):
        cut = jnp.sort(p.ravel())[-n_keep]
        return (p >= cut) & (p > 0)

    @jax.jit
    def by_top_k(p):
        cut = jax.lax.top_k(p.ravel(), n_keep)[0][-1]
        return (p >= cut) & (p > 0)

    @jax.jit
    def matmuls(x, w):
        return (x @ w) @ w.T  # encoder and decoder products of one forward

    variants = {"bisection (caft_jax)": (bisection, (post,)), "full sort": (by_sort, (post,)),
                "lax.top_k": (by_top_k, (post,)), "encoder + decoder matmuls": (matmuls, (x, w))}  # fmt: skip
    np.testing.assert_array_equal(np.asarray(bisection(post)), np.asarray(by_sort(post)))
    times = {name: [] for name in variants}
    for fn, inputs in variants.values():
        jax.block_until_ready(fn(*inputs))  # compile
    for _ in range(args.repeats):
        for name, (fn, inputs) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - start)
    print(f"B={args.batch}, d_sae={args.dict_size}, d={args.d}, k={args.k}: median of {args.repeats}, ms")
    for name, values in times.items():
        print(f"  {name:28s} {1e3 * np.median(values):9.1f}")


if __name__ == "__main__":
    main()
