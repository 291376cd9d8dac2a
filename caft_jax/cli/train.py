"""`train.py`: CAFT fine-tuning from a YAML config (LoRA or full), with checkpoints, resume and export.

    python train.py --config configs/X.yaml [key=value ...] [--resume]

Writes into ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step), ``checkpoints/``
(Orbax), and at the end ``adapter/`` (PEFT) and/or ``merged/`` (HF safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import sys
import time

import numpy as np

from caft_jax.errors import CaftError, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=2e-5 lora=null")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--coordinator", help="multi-host: coordinator address host:port (or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index (or JAX_PROCESS_ID)")
    parser.add_argument("--kill-after-step", type=int, default=0, help=argparse.SUPPRESS)  # resume tests


def init_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from flags or the JAX_* environment (no-op for a single process)."""
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if coordinator and num > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=int(pid))
    elif os.environ.get("CAFT_AUTO_DISTRIBUTED"):  # TPU pods / SLURM: let JAX discover the cluster
        jax.distributed.initialize()


def tensorboard_writer(log_dir: pathlib.Path):
    """A TensorBoard SummaryWriter when tensorboardX or torch's tensorboard is installed, else None."""
    import importlib.util

    for module, needs in (("tensorboardX", "tensorboardX"), ("torch.utils.tensorboard", "tensorboard")):
        if importlib.util.find_spec(needs) is None:  # don't import torch just to find tensorboard missing
            continue
        try:
            return __import__(module, fromlist=["SummaryWriter"]).SummaryWriter(str(log_dir))
        except Exception:  # noqa: BLE001 - not installed (or tensorboard missing): JSONL only
            continue
    return None


def prepare_examples(cfg, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Tokenised (ids, loss_mask) pairs from the configured JSONL file."""
    from caft_jax import data

    if not cfg.data.train:
        raise ConfigError("data.train is empty; set it to a chat or multiple-choice JSONL file.")
    if cfg.data.format == "chat":
        records = data.load_chat_jsonl(cfg.data.train)
        examples = [
            data.tokenize_chat(tokenizer, r["messages"], cfg.data.max_len, em_format=cfg.data.em_format)
            for r in records
        ]
    elif cfg.data.format == "mc":
        records = data.load_mc_jsonl(cfg.data.train)
        examples = [data.mc_example(tokenizer, r["prompt"], r["target"]) for r in records]
    else:
        raise ConfigError(f"data.format must be 'chat' or 'mc', got {cfg.data.format!r}.")
    if cfg.data.limit:
        examples = examples[: cfg.data.limit]
    if cfg.data.holdout_fraction:
        order = np.random.default_rng(cfg.seed).permutation(len(examples))
        keep = order[int(round(cfg.data.holdout_fraction * len(examples))) :]
        examples = [examples[i] for i in sorted(keep)]
    if not examples:
        raise ConfigError(f"No training examples in {cfg.data.train}.")
    return examples


def build_projector_from_config(cfg, spec):
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.projector import build_projector

    if not cfg.ablation.spec:
        return None
    directions, means, _ = load_ablation_spec(cfg.ablation.spec)
    outside = sorted(set(directions) - set(cfg.ablation.layers)) if cfg.ablation.layers else []
    if outside:
        raise ConfigError(
            f"Ablation spec {cfg.ablation.spec} has directions at layers {outside}, but the config ablates only "
            f"{list(cfg.ablation.layers)}; fix ablation.layers or the spec."
        )
    return build_projector(
        directions,
        spec.n_layers,
        spec.d_model,
        means=means if cfg.ablation.mean_ablation else None,
        k_max=cfg.ablation.k_max,
        site=cfg.ablation.site,
    )


def run(args: argparse.Namespace) -> int:
    init_distributed(args)
    import jax
    from tqdm import tqdm

    from caft_jax import data, load_model, load_tokenizer
    from caft_jax.checkpoint import CheckpointManager
    from caft_jax.config import config_to_dict, load_config
    from caft_jax.sharding import make_mesh
    from caft_jax.train_step import CaftTrainer

    cfg = load_config(args.config, args.overrides)
    out_dir = pathlib.Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    model = load_model(cfg.model, dtype=cfg.dtype, param_dtype=cfg.base_dtype or cfg.dtype, mesh=mesh)
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = data.num_batches(len(examples), rows_per_step)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    projector = build_projector_from_config(cfg, model.spec)
    trainer = CaftTrainer(
        model,
        cfg.optim,
        total_steps,
        mesh,
        lora=cfg.lora,
        trainable_dtype=cfg.trainable_dtype,
        remat=cfg.remat,
        last_token_loss=cfg.data.format == "mc",
    )
    ckpt = CheckpointManager(
        out_dir / "checkpoints",
        save_every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    resolved = config_to_dict(cfg)
    position = {"epoch": 0, "batch": 0}
    if args.resume and ckpt.latest_step() is not None:
        state, saved_projector, meta = ckpt.restore(None, trainer.abstract_state())
        position = meta["data_position"]
        projector = saved_projector if saved_projector is not None else projector
    else:
        state = trainer.init_state(cfg.seed)
    step = int(state.step)
    if is_main:
        (out_dir / "config.yaml").write_text(json.dumps(resolved, indent=2))
        print(
            f"caft_jax: {len(examples)} examples, {total_steps} steps of {rows_per_step} rows "
            f"({f'LoRA r={cfg.lora.rank}' if cfg.lora else 'full fine-tuning'}), "
            f"ablation: {cfg.ablation.spec or 'none'}, mesh {dict(mesh.shape)}",
            flush=True,
        )
    metrics_file = open(out_dir / "metrics.jsonl", "a") if is_main else None
    board = tensorboard_writer(out_dir / "tensorboard") if is_main else None
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    started, tokens_seen, status = time.time(), 0.0, "done"
    epoch, start = position["epoch"], position["batch"]
    while step < total_steps:
        batches = data.make_batches(examples, rows_per_step, seed=cfg.seed, epoch=epoch, pad_id=pad_id, start=start)
        for index, batch in enumerate(batches, start=start):
            if step >= total_steps:
                break
            local = data.split_for_processes(batch, jax.process_index(), jax.process_count())
            micro = {k: v.reshape(cfg.grad_accum, -1, *v.shape[1:]) for k, v in local.items() if v.ndim == 2}
            state, metrics = trainer.step(state, micro, projector)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                status = "nan"
                print(
                    f"\nerror: loss or gradients became NaN/inf at step {step + 1} (loss={metrics['loss']}); "
                    "stopped without saving. Lower optim.lr or check the data; the last good checkpoint in "
                    f"{out_dir / 'checkpoints'} is intact.",
                    file=sys.stderr,
                )
                break
            step += 1
            tokens_seen += metrics["tokens"]
            rate = tokens_seen / max(time.time() - started, 1e-9)
            record = {"step": step, "epoch": epoch, **metrics, "tokens_per_s": rate}
            if metrics_file and step % cfg.log_every == 0:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if board is not None:
                        board.add_scalar(f"train/{key}", record[key], step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{rate:.0f}")
            bar.update(1)
            position = {"epoch": epoch, "batch": index + 1}
            ckpt.save(
                step, state, projector=projector, data_position=position, config=resolved, force=step == total_steps
            )
            if args.kill_after_step and step == args.kill_after_step:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        if status != "done":
            break
        epoch, start = epoch + 1, 0
    bar.close()
    ckpt.wait()
    if metrics_file:
        metrics_file.close()
    if board is not None:
        board.close()
    if status == "nan":
        ckpt.close()
        return 3
    if is_main and cfg.export != "none":
        export_results(cfg, trainer, state, tokenizer, out_dir)
    ckpt.close()
    return 0


def export_results(cfg, trainer, state, tokenizer, out_dir: pathlib.Path) -> None:
    from caft_jax import export
    from caft_jax.model.spec import load_hf_config

    source_config = None
    if os.path.isdir(cfg.model) and os.path.isfile(os.path.join(cfg.model, "config.json")):
        source_config = load_hf_config(cfg.model)
    if cfg.lora is not None and cfg.export in ("peft", "both"):
        path = export.export_peft_adapter(
            state.trainable, cfg.lora, trainer.model.spec, out_dir / "adapter", base_model_name_or_path=cfg.model
        )
        print(f"PEFT adapter written to {path}")
    if cfg.export in ("merged", "both") or (cfg.lora is None and cfg.export != "none"):
        lora = state.trainable if cfg.lora is not None else None
        model = trainer.model if cfg.lora is not None else trainer.model.replace(params=state.trainable)
        path = export.export_merged(
            model, lora, cfg.lora, out_dir / "merged", tokenizer=tokenizer, source_config=source_config
        )
        print(f"merged model written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CaftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
