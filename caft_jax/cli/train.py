"""`train.py`: CAFT fine-tuning from a YAML config (LoRA or full), with checkpoints, resume and export.

    python train.py --config configs/X.yaml [key=value ...] [--resume]

Writes into ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step), ``checkpoints/``
(Orbax), and at the end ``adapter/`` (PEFT) and/or ``merged/`` (HF safetensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys

import numpy as np

from caft_jax.cli.handler import guarded
from caft_jax.errors import ConfigError, DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=2e-5 lora=null")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint"
    )
    parser.add_argument("--resume-step", type=int, help="continue from this checkpoint step instead (implies --resume)")
    parser.add_argument("--overwrite", action="store_true", help="delete what output_dir holds and start a new run")
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
    from caft_jax.chat import require_chat_template

    if not cfg.data.train:
        raise ConfigError("data.train is empty; set it to a chat or multiple-choice JSONL file.")
    if cfg.data.format == "chat":
        require_chat_template(tokenizer, "data.format=chat")
        records = data.load_chat_jsonl(cfg.data.train)
        examples = data.chat_examples(tokenizer, records, cfg.data.max_len, em_format=cfg.data.em_format)
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
    trained = [ex for ex in examples if any(ex[1])]
    if not trained:
        raise DataError(
            f"no record of {cfg.data.train} has a trained token left after truncation to data.max_len="
            f"{cfg.data.max_len} (the answers start later); raise data.max_len."
        )
    if len(trained) < len(examples):
        print(
            f"caft_jax: dropped {len(examples) - len(trained)} of {len(examples)} records whose answer starts past "
            f"data.max_len={cfg.data.max_len}",
            flush=True,
        )
    return trained


def build_projector_from_config(cfg, spec):
    """The training projector of ``cfg.ablation`` for a model of ``spec`` (None without a spec file)."""
    from caft_jax.ablation_spec import projector_from_spec

    if not cfg.ablation.spec:
        return None
    return projector_from_spec(
        cfg.ablation.spec,
        spec.n_layers,
        spec.d_model,
        mean_ablation=cfg.ablation.mean_ablation,
        allowed_layers=cfg.ablation.layers or None,
        k_max=cfg.ablation.k_max,
        site=cfg.ablation.site,
        strength=cfg.ablation.strength,
        steer_coeff=cfg.ablation.steer_coeff,
        gradient=cfg.ablation.gradient,
        positions=cfg.ablation.positions,
    )


# Recipe values a resume may change: they decide how a run is logged and kept, not what it computes.
RESUME_MAY_CHANGE = ("log_every", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save")


def run_manifest(cfg, resolved: dict) -> dict:
    from caft_jax import rundir

    return rundir.build_manifest(
        resolved, cfg.model, inputs={"data.train": cfg.data.train, "ablation.spec": cfg.ablation.spec}
    )


def restore_or_init(args, cfg, trainer, ckpt, projector):
    """(state, projector, data position): a fresh state, or the checkpoint that --resume / --resume-step names."""
    from caft_jax.errors import CheckpointError

    if not args.resume:
        return trainer.init_state(cfg.seed), projector, {"epoch": 0, "batch": 0}
    if ckpt.latest_step() is None:
        raise CheckpointError(
            f"--resume: {ckpt.directory} holds no complete checkpoint yet; rerun with --overwrite to start over."
        )
    state, saved_projector, meta = ckpt.restore(args.resume_step, trainer.abstract_state())
    if args.resume_step is not None:
        abandoned = ckpt.discard_after(int(state.step))
        if abandoned:
            print(f"resuming from step {int(state.step)}: removed the later checkpoints {abandoned}", flush=True)
    return state, (saved_projector if saved_projector is not None else projector), meta["data_position"]


@dataclasses.dataclass
class Request:
    """A checked train.py request: the recipe and everything derived from it before any weights are read."""

    cfg: object  # TrainConfig
    resolved: dict
    manifest: dict
    mesh: object
    projector: object
    tokenizer: object
    examples: list


def check_request(args: argparse.Namespace) -> Request:
    """Everything the user gave, checked against the model's config (and the data tokenised) before its weights
    are read."""
    from caft_jax import data, load_tokenizer
    from caft_jax.config import config_to_dict, load_config
    from caft_jax.io.hf import model_spec
    from caft_jax.sharding import check_batch_divides, make_mesh

    cfg = load_config(args.config, args.overrides)
    if cfg.data.pack and cfg.data.format != "chat":
        raise ConfigError("data.pack packs chat records; multiple-choice rows are short and bucketed already.")
    resolved = config_to_dict(cfg)
    manifest = run_manifest(cfg, resolved)
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg.batch_size, mesh)
    spec = model_spec(cfg.model)
    projector = build_projector_from_config(cfg, spec)
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_examples(cfg, tokenizer)
    data.check_token_ids(examples, spec.vocab_size)
    return Request(cfg, resolved, manifest, mesh, projector, tokenizer, examples)


def open_run_dir(args: argparse.Namespace, request: Request, out_dir: pathlib.Path) -> None:
    """The run-directory contract; only now, with everything checked, may --overwrite delete the old run."""
    from caft_jax import rundir

    rundir.prepare(out_dir, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        rundir.check_resume(out_dir, request.manifest, ignore=RESUME_MAY_CHANGE)


def steps_per_epoch(cfg, examples) -> int:
    from caft_jax import data

    rows_per_step = cfg.batch_size * cfg.grad_accum
    if cfg.data.pack:
        return data.num_packed_batches(
            examples, rows_per_step, seed=cfg.seed, epoch=0, row_len=cfg.data.pack_len or None
        )
    return data.num_batches(len(examples), rows_per_step)


def batch_source(cfg, examples, pad_id: int):
    """batches(epoch, start) of the recipe: bucketed rows, or packed rows with data.pack."""
    from caft_jax import data

    rows_per_step = cfg.batch_size * cfg.grad_accum

    def batches(epoch: int, start: int):
        order = dict(seed=cfg.seed, epoch=epoch, pad_id=pad_id, start=start)
        if cfg.data.pack:
            return data.make_packed_batches(examples, rows_per_step, row_len=cfg.data.pack_len or None, **order)
        return data.make_batches(examples, rows_per_step, **order)

    return batches


def record_start(request: Request, out_dir: pathlib.Path, model, step: int, total_steps: int) -> None:
    """Metrics cut back to the resumed step, manifest and resolved config written, one summary line."""
    from caft_jax import rundir
    from caft_jax.fit import truncate_metrics
    from caft_jax.lora import lora_param_count

    cfg = request.cfg
    truncate_metrics(out_dir / "metrics.jsonl", step)
    rundir.write_manifest(out_dir, request.manifest)
    (out_dir / "config.yaml").write_text(json.dumps(request.resolved, indent=2))
    tuned = f"LoRA r={cfg.lora.rank}, {lora_param_count(model, cfg.lora):,} params" if cfg.lora else "full fine-tuning"
    print(
        f"caft_jax: {len(request.examples)} examples, {total_steps} steps of {cfg.batch_size * cfg.grad_accum} rows "
        f"({tuned}), ablation: {cfg.ablation.spec or 'none'}, mesh {dict(request.mesh.shape)}",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    init_distributed(args)
    import jax

    from caft_jax import data, load_model
    from caft_jax.checkpoint import CheckpointManager
    from caft_jax.fit import fit
    from caft_jax.train_step import CaftTrainer

    if args.resume_step is not None:
        args.resume = True
    request = check_request(args)
    cfg = request.cfg
    out_dir = pathlib.Path(cfg.output_dir)
    is_main = jax.process_index() == 0
    if is_main:
        open_run_dir(args, request, out_dir)
    model = load_model(
        cfg.model,
        dtype=cfg.dtype,
        param_dtype=cfg.base_dtype or cfg.dtype,
        matmul_dtype=cfg.matmul_dtype,
        mesh=request.mesh,
    )
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch(cfg, request.examples) * cfg.epochs))
    trainer = CaftTrainer(
        model,
        cfg.optim,
        total_steps,
        request.mesh,
        lora=cfg.lora,
        trainable_dtype=cfg.trainable_dtype,
        remat=cfg.remat,
        last_token_loss=cfg.data.format == "mc",
        packed=cfg.data.pack,
    )
    ckpt = CheckpointManager(
        out_dir / "checkpoints",
        save_every=cfg.checkpoint.every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    state, projector, position = restore_or_init(args, cfg, trainer, ckpt, request.projector)
    if is_main:
        record_start(request, out_dir, model, int(state.step), total_steps)
    board = tensorboard_writer(out_dir / "tensorboard") if is_main else None
    result = fit(
        trainer,
        state,
        batch_source(cfg, request.examples, data.pad_token_id(request.tokenizer)),
        total_steps,
        projector=projector,
        grad_accum=cfg.grad_accum,
        position=position,
        checkpoints=ckpt,
        checkpoint_config=request.resolved,
        metrics_path=out_dir / "metrics.jsonl",
        log_every=cfg.log_every,
        on_metrics=None if board is None else lambda r: log_scalars(board, r),
        stop_after_step=args.kill_after_step,
    )
    if board is not None:
        board.close()
    return finish(result, request, trainer, ckpt, out_dir, export=is_main)


def finish(result, request: Request, trainer, ckpt, out_dir: pathlib.Path, *, export: bool) -> int:
    """The exit code of a finished fit: 0 after the export, 3 on divergence, 130/143 when interrupted."""
    from caft_jax.fit import SIGNAL_EXIT

    if result.status == "stopped":  # the resume tests' stand-in for a crash
        os.kill(os.getpid(), signal.SIGKILL)
    last_good = ckpt.latest_step()
    ckpt.close()
    if result.status == "diverged":
        print(
            f"error: loss, gradients or parameters became NaN/inf at step {result.bad_step}; stopped without saving "
            f"it. The last good checkpoint is step {last_good} in {out_dir / 'checkpoints'}: lower optim.lr or check "
            "the data, then rerun with --resume (or --resume-step N for an earlier step).",
            file=sys.stderr,
        )
        return 3
    if result.status == "interrupted":
        print(f"interrupted at step {result.step}; rerun with --resume", file=sys.stderr)
        return SIGNAL_EXIT[result.signal]
    if export and request.cfg.export != "none":
        export_results(request.cfg, trainer, result.state, request.tokenizer, out_dir)
    return 0


def log_scalars(board, record: dict) -> None:
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        board.add_scalar(f"train/{key}", record[key], record["step"])


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


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: run(args), rerun_hint="rerun with --resume")
