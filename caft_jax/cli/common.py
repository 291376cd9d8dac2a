"""Shared pieces of the ``eval.py`` subcommands: the model/adapter/ablation arguments and their loading.

Every evaluation takes the same three inputs: a base model (HF directory or GGUF), an optional PEFT LoRA adapter
(what ``train.py`` exports), and an optional ablation spec applied at test time (``--ablate``). ``load_for_eval``
turns them into what ``forward`` / ``generate`` take as traced arguments.
"""

from __future__ import annotations

import argparse
import os


def add_model_arguments(parser: argparse.ArgumentParser, *, several_adapters: bool = False) -> None:
    """--model, --adapter, --ablate, --ablate-site, --no-mean-ablation, --dtype (same spelling in every subcommand).

    ``several_adapters`` makes --adapter take one or more directories (e.g. one per training seed; args.adapter is
    then a list or None).
    """
    parser.add_argument("--model", required=True, help="HF model directory or .gguf file (the base model)")
    if several_adapters:
        parser.add_argument(
            "--adapter", nargs="+", default=None, help="PEFT LoRA adapter directories (e.g. one per seed)"
        )
    else:
        parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory applied on top of --model")
    parser.add_argument(
        "--ablate", default=None, help="ablation spec file (.safetensors/.npz) projected out at test time"
    )
    parser.add_argument(
        "--ablate-site", default="resid_post", choices=["resid_post", "resid_mid"], help="where --ablate projects"
    )
    parser.add_argument(
        "--no-mean-ablation", action="store_true", help="zero-ablate even when the spec stores per-layer means"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")


def load_for_eval(
    model_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    ablate: str | os.PathLike | None = None,
    dtype: str = "float32",
    *,
    site: str = "resid_post",
    mean_ablation: bool = True,
):
    """Load (model, tokenizer, lora, lora_settings, projector) for evaluation.

    Args:
      model_path: HF directory or .gguf file.
      adapter: PEFT adapter directory, or None (lora and lora_settings are then None).
      ablate: ablation spec file, or None (projector is then None: the plain model, not an empty projector).
      dtype: compute dtype, "float32" or "bfloat16".
      site: the residual site the projector acts on.
      mean_ablation: use the spec's means as offsets when it has them (the training default).
    Returns:
      model (Model), tokenizer (transformers), lora (dict or None), lora_settings (LoraSettings or None; the
      dropout is forced to 0 because evaluation never drops out), projector (Projector or None).
    Raises:
      CheckpointError / ConfigError / ProjectorError (CaftError) naming the bad path and the fix.
    """
    from caft_jax import load_model, load_tokenizer
    from caft_jax.io.hf import model_spec

    projector = None
    if ablate is not None:  # checked against the model's config (layers, width) before its weights are read
        projector = load_projector(ablate, model_spec(model_path), site=site, mean_ablation=mean_ablation)
    model = load_model(model_path, dtype=dtype)
    tokenizer = load_tokenizer(model_path)
    lora = lora_settings = None
    if adapter is not None:
        lora, lora_settings = load_adapter(adapter, model)
    return model, tokenizer, lora, lora_settings, projector


def load_adapter(adapter: str | os.PathLike, model):
    """(lora, lora_settings) of a PEFT adapter directory, with dropout off (evaluation never drops out)."""
    import dataclasses

    from caft_jax.export import load_peft_adapter

    lora, lora_cfg = load_peft_adapter(adapter, model)
    return lora, dataclasses.replace(lora_cfg.settings(), dropout=0.0)


def load_projector(path: str | os.PathLike, spec, *, site: str = "resid_post", mean_ablation: bool = True):
    """Build the test-time projector from an ablation spec file for a model with ``spec``."""
    from caft_jax.ablation_spec import projector_from_spec

    return projector_from_spec(path, spec.n_layers, spec.d_model, mean_ablation=mean_ablation, site=site)


def load_args(args: argparse.Namespace):
    """``load_for_eval`` from the arguments that ``add_model_arguments`` defined."""
    return load_for_eval(
        args.model,
        args.adapter,
        args.ablate,
        args.dtype,
        site=getattr(args, "ablate_site", "resid_post"),
        mean_ablation=not getattr(args, "no_mean_ablation", False),
    )
