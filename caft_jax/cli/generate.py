"""`eval.py generate`: sample continuations of prompts, optionally with an adapter and test-time ablation.

    python eval.py generate --model DIR [--adapter DIR] [--ablate SPEC] --prompt "Hi" "Hello" [--chat] [--greedy]
    python eval.py generate --model DIR --prompts-file prompts.jsonl --out answers.jsonl

A prompts file holds one JSON object per line with a "prompt" string (other fields are copied to the output).
Output: one JSON object per prompt ({"prompt", "text", "token_ids", "finish_reason", ...}) to --out, or the texts
to stdout.
"""

from __future__ import annotations

import argparse
import sys

from caft_jax.cli.common import add_model_arguments, load_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", help="one or more prompt texts")
    source.add_argument("--prompts-file", help='JSONL file, one {"prompt": ...} per line')
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=600, help="tokens to generate at most per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--greedy", action="store_true", help="take the most likely token at every step")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per jitted batch")
    parser.add_argument("--out", default=None, help="write results as JSONL here instead of printing the texts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def read_prompts(path: str) -> list[dict]:
    """Records of a prompts JSONL file, each with a string "prompt"; DataError names the first bad line."""
    from caft_jax.errors import DataError
    from caft_jax.jsonio import read_jsonl

    records = []
    for line_no, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{path} line {line_no}: no string "prompt"; each line must be {{"prompt": "..."}}.')
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    import pathlib

    from caft_jax.generate import SamplingConfig, generate

    records = read_prompts(args.prompts_file) if args.prompts_file else [{"prompt": p} for p in args.prompt]
    if args.out:
        from caft_jax.jsonio import write_jsonl
        from caft_jax.rundir import claim_files

        out = pathlib.Path(args.out)
        claim_files(out.parent, [out.name], overwrite=args.overwrite)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
    )
    model, tokenizer, lora, lora_settings, projector = load_args(args)
    results = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        cfg,
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        batch_size=args.batch_size,
        chat=args.chat,
        system=args.system,
        progress=not args.no_progress,
    )
    rows = [{**record, **result} for record, result in zip(records, results, strict=True)]
    if args.out:
        write_jsonl(out, rows)
        print(f"wrote {len(rows)} generations to {out}", file=sys.stderr)
    else:
        for row in rows:
            print(f"### {row['prompt']}\n{row['text']}\n[{row['finish_reason']}, {len(row['token_ids'])} tokens]\n")
    return 0
