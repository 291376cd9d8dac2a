"""A/B of library variants of the CAFT train step, interleaved in one process (so machine noise hits all alike).

    python benchmarks/ab_step.py none previous                 # this library against the one before 27 Nov's changes
    python benchmarks/ab_step.py none autodiff-attention sliced-loss autodiff-linear --rounds 8
    python benchmarks/ab_step.py none previous --full --batch 2

Each variant is a set of patches from train_step.py's JAX_PATCHES ("none" = the library as is), applied only while
that variant's step is traced and compiled, then undone. The steps (SmolLM2-135M shapes by default, LoRA r=32 on 7
targets or --full, projector at 3 layers, random weights, AdamW) then run in rotating order for --rounds rounds;
reported: median wall and process-CPU seconds per step and the change against the first variant. On a shared
2-vCPU VM single runs move by 5-10%, which is why the comparison is interleaved rather than across invocations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import train_step as bench  # noqa: E402  (benchmarks/train_step.py: shapes, patches, random inputs)


def patched_attributes():
    """The module attributes the patches replace, so that each variant can be undone."""
    from caft_jax import train_step
    from caft_jax.model import layers, transformer

    return [
        (layers, "linear"),
        (layers, "_attend"),
        (layers, "CAUSAL_BLOCK"),
        (train_step, "token_losses"),
        (transformer, "head_logits"),
        (transformer, "intervene"),
        (transformer, "projection_stats"),
        (train_step.CaftTrainer, "loss_grads_and_stats"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=tuple(bench.JAX_PATCHES), help="first = the reference")
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (master: fp32)")
    p.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), help="operand dtype of the products")
    p.add_argument("--loss", choices=("tokens", "last"), default="tokens", help="all tokens, or the last one (MC)")
    p.add_argument("--cost", action="store_true", help="also print XLA's cost analysis (flops, bytes) per variant")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from caft_jax.aot import PRESETS
    from caft_jax.lora import LoraConfig
    from caft_jax.model.spec import spec_from_hf_config
    from caft_jax.model.transformer import init_model
    from caft_jax.optim import OptimConfig
    from caft_jax.projector import build_projector
    from caft_jax.sharding import make_mesh
    from caft_jax.train_step import CaftTrainer

    spec = spec_from_hf_config(PRESETS[args.preset])
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = init_model(spec, param_dtype=args.dtype, dtype=args.dtype, matmul_dtype=args.matmul_dtype)
    optim = OptimConfig(lr=1e-5, weight_decay=0.01, warmup_steps=0, clip_norm=1.0)
    lora = None if args.full else LoraConfig(rank=bench.LORA_RANK, alpha=bench.LORA_ALPHA, rslora=True)
    directions = bench.random_directions(spec.n_layers, spec.d_model, 8)
    projector = build_projector(directions, spec.n_layers, spec.d_model, k_max=8)
    tokens = bench.random_tokens(spec.vocab_size, args.batch, args.seq)[None]  # [accum=1, b, t]
    ones = np.ones(tokens.shape, bool)
    loss_mask = ones if args.loss == "tokens" else np.zeros(tokens.shape, bool)
    loss_mask[..., -1] = True

    steps, states, costs = {}, {}, {}
    for name in args.variants:
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr in patched_attributes()]
        for patch in bench.JAX_PATCHES[name]:
            patch()
        try:
            trainer = CaftTrainer(model, optim, 1000, mesh, lora=lora, last_token_loss=args.loss == "last")
            states[name] = trainer.init_state(seed=0)
            batch = trainer.place_batch({"tokens": tokens, "attn_mask": ones, "loss_mask": loss_mask})
            frozen = trainer.frozen_params()
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                fn = trainer.compiled_step(states[name], projector).lower(states[name], frozen, batch, projector)
                fn = fn.compile()
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.cost:  # the compiler's own count: exact, and free of the machine's timing noise
                costs[name] = step_cost(fn)
            steps[name] = (fn, frozen, batch)
        finally:
            for mod, attr, value in saved:
                setattr(mod, attr, value)

    def run(name):
        fn, frozen, batch = steps[name]
        with jax.set_mesh(mesh):
            states[name], metrics = fn(states[name], frozen, batch, projector)
        jax.block_until_ready((states[name], metrics))
        return metrics

    for name in args.variants:  # warm-up
        run(name)
    wall = {n: [] for n in args.variants}
    cpu = {n: [] for n in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for name in order if r % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = run(name)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            assert bool(metrics["finite"]), f"variant {name}: non-finite loss"
    ref_wall, ref_cpu = statistics.median(wall[args.variants[0]]), statistics.median(cpu[args.variants[0]])
    mode = "full fine-tuning" if args.full else f"LoRA r={bench.LORA_RANK}"
    loss = "last-token loss" if args.loss == "last" else "loss on all tokens"
    precision = args.dtype + (f", {args.matmul_dtype} products" if args.matmul_dtype else "")
    print(f"\n{args.preset}, {mode}, {precision}, {loss}, batch {args.batch} x seq {args.seq}, {args.rounds} rounds\n")
    print("| variant | step s (median) | CPU s/step (median) | wall vs first | CPU vs first |")
    print("|---|---|---|---|---|")
    for name in args.variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {w:.3f} | {c:.2f} | {w / ref_wall - 1:+.1%} | {c / ref_cpu - 1:+.1%} |")
    if costs:
        ref = costs[args.variants[0]]
        print("\n| variant | GFLOP per step (XLA) | GB accessed per step (XLA) | flops vs first | bytes vs first |")
        print("|---|---|---|---|---|")
        for name in args.variants:
            f, b = costs[name]
            print(f"| {name} | {f / 1e9:.3f} | {b / 1e9:.3f} | {f / ref[0] - 1:+.3%} | {b / ref[1] - 1:+.3%} |")
    return 0


def step_cost(compiled) -> tuple[float, float]:
    """(flops, bytes accessed) of a compiled step by XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


if __name__ == "__main__":
    raise SystemExit(main())
