"""The pieces every `python -m caft_jax.discover` command shares: argument parsing helpers, the output-folder claim,
layer checks against the model's config, and loading the model, an adapter, a fine-tune and the discovery data."""

from __future__ import annotations

import pathlib

from caft_jax.errors import ConfigError


def layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--layers must be comma-separated integers like 3,6,9; got {text!r}.") from e


def claim_outputs(args, *names: str, create: bool = True) -> pathlib.Path:
    """--out-dir, after checking that none of the files this command writes exists there (unless --overwrite);
    created unless ``create`` is False."""
    from caft_jax.rundir import claim_files

    return claim_files(pathlib.Path(args.out_dir), names, overwrite=args.overwrite, create=create)


def checked_layers(args, layers) -> list[int]:
    """The layer indices, checked against the model's config (no weights read)."""
    from caft_jax.io.hf import model_spec

    n_layers = model_spec(args.model).n_layers
    bad = sorted(int(layer) for layer in layers if not 0 <= int(layer) < n_layers)
    if bad:
        raise ConfigError(f"layers {bad} do not exist: {args.model} has layers 0..{n_layers - 1}; fix --layers.")
    return [int(layer) for layer in layers]


def model_and_tokenizer(args):
    from caft_jax import load_model, load_tokenizer

    return load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)


def adapter_of(args, model):
    """(lora, lora_settings) of --adapter on the model, or (None, None) without one."""
    if not args.adapter:
        return None, None
    from caft_jax.cli.common import load_adapter

    return load_adapter(args.adapter, model)


def training_batches(args, tokenizer):
    """Batches of the discovery data: chat JSONL (answer tokens) or multiple-choice JSONL (prompt + letter)."""
    from caft_jax import data

    if args.format == "chat":
        records = data.load_chat_jsonl(args.data)
        examples = data.chat_examples(tokenizer, records, args.max_len)
    else:
        records = data.load_mc_jsonl(args.data)
        examples = [data.mc_example(tokenizer, r["prompt"], r["target"]) for r in records]
    examples = examples[: args.limit] if args.limit else examples
    return list(
        data.make_batches(
            examples, args.batch_size, seed=0, epoch=0, pad_id=data.pad_token_id(tokenizer), shuffle=False
        )
    )


def tuned_model(args, model):
    """(tuned, lora_settings) of the fine-tune to compare with the base: --adapter (a LoRA tree on ``model`` and
    its settings) or --tuned (a full model, settings None)."""
    if args.adapter:
        from caft_jax.export import load_peft_adapter

        tuned, lora_cfg = load_peft_adapter(args.adapter, model)
        return tuned, lora_cfg.settings()
    if args.tuned:
        from caft_jax import load_model

        return load_model(args.tuned, dtype=args.dtype), None
    raise ConfigError(f"{args.command} needs the fine-tuned model: pass --adapter DIR (PEFT) or --tuned MODEL_DIR.")
