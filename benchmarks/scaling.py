#!/usr/bin/env python
"""How the CAFT step's time grows with sequence length and batch, caft_jax against the authors' PyTorch step.

    python benchmarks/scaling.py                                   # LoRA, float32
    python benchmarks/scaling.py --dtype bfloat16 --seqs 256 1024  # any subset

Runs ``benchmarks/train_step.py`` once per point (each framework in its own subprocess, side by side in that
run): batch 1 at every length of --seqs, and every batch of --batches at --batch-seq tokens. Reports seconds per
step, tokens/s and the caft_jax / PyTorch ratio per point, and writes one section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_step as bench  # noqa: E402  (write_results, machine_info)


def run_point(batch: int, seq: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--batch", str(batch), "--seq", str(seq)]
    cmd += ["--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup), "--overhead-steps", "0"]
    cmd += ["--results", "", "--json", out, *(["--full"] if args.full else [])]
    print(f"== batch {batch} x seq {seq}", flush=True)
    subprocess.run(cmd, check=False)
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {"jax": {"error": "no report"}, "torch": {"error": "no report"}}
    finally:
        os.unlink(out)


def row(batch: int, seq: int, res: dict) -> str:
    jx, tc = res.get("jax", {}), res.get("torch", {})
    cells = [f"{batch} x {seq}"]
    for rep in (jx, tc):
        cells.append(f"{rep['step_s']:.2f} ({rep['tokens_per_s']:.0f})" if "step_s" in rep else "failed")
    ratio = jx["tokens_per_s"] / tc["tokens_per_s"] if "step_s" in jx and "step_s" in tc else None
    cells.append(f"{ratio:.2f}x" if ratio else "n/a")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048], help="lengths at batch 1")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batches at --batch-seq")
    p.add_argument("--batch-seq", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--results", default=bench.RESULTS, help="markdown file to update ('' to skip)")
    args = p.parse_args(argv)

    points = [(1, s) for s in args.seqs] + [(b, args.batch_seq) for b in args.batches]
    points = list(dict.fromkeys(points))  # batch 1 at batch_seq may appear twice
    results = {pt: run_point(*pt, args) for pt in points}
    info = bench.machine_info()
    mode = "full fine-tuning" if args.full else "LoRA r=32 rsLoRA, 7 targets"
    lines = [f"Command: `python benchmarks/scaling.py {shlex.join(argv)}`", ""]
    lines.append(
        f"Machine: {info['nproc']} CPUs, {info['cpu']} ({', '.join(info['isa'])}); jax {info['jax']}, torch "
        f"{info['torch']}. Step: SmolLM2-135M shapes, random weights, {args.dtype}, {mode}, ablation at 3 layers; "
        f"median of {args.steps} steps after {args.warmup} warm-up, each point one `train_step.py` run."
    )
    lines.append("")
    lines.append("| batch x seq | caft_jax s/step (tokens/s) | PyTorch s/step (tokens/s) | caft_jax / PyTorch |")
    lines.append("|---|---|---|---|")
    lines += [row(b, s, results[(b, s)]) for b, s in points]
    key = f"scaling: sequence length and batch, {'full' if args.full else 'LoRA'}, {args.dtype}"
    bench.publish("\n".join(lines), args.results, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
