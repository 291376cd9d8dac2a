"""`eval.py logits`: load a model, run one prompt, print the most likely next tokens.

The quick check that a checkpoint loaded correctly: a real model should put most of its probability on a
sensible continuation ("Paris" after "The capital of France is").
"""

from __future__ import annotations

import argparse

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or .gguf file")
    parser.add_argument("--prompt", default="The capital of France is", help="text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--top", type=int, default=10, help="how many next tokens to print")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    import jax
    import jax.numpy as jnp

    from caft_jax import jit_forward, load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    if args.chat:
        from caft_jax.chat import encode_messages

        ids = encode_messages(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    logits = jit_forward(model, jnp.asarray([ids], jnp.int32)).logits[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-probs)[: args.top]
    rows = [{"token_id": int(i), "token": tokenizer.decode([int(i)]), "prob": float(probs[i])} for i in top]
    if args.json:
        print(json.dumps({"prompt_tokens": len(ids), "top": rows}, indent=2))
    else:
        print(f"{len(ids)} prompt tokens; top {args.top} next tokens:")
        for r in rows:
            print(f"  {r['prob']:8.4f}  {r['token_id']:>7d}  {r['token']!r}")
    return 0
