"""One fine-tuning run of the pipeline, in process: train on multiple-choice items, then score them.

The base model is loaded once and shared by every run (each run starts from a fresh copy of its params), which is
what makes 10+ runs fit a laptop budget. Runs use the same jitted train step as ``train.py`` (``CaftTrainer``) and
the same evaluation as ``eval.py mc`` (``mc_accuracy``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from caft_jax import data
from caft_jax.batching import MC_TRAIN_SIZES
from caft_jax.config import TrainConfig
from caft_jax.evaluate_mc import mc_accuracy
from caft_jax.fit import SIGNAL_EXIT, TrainingDiverged, TrainingInterrupted, final_loss, fit
from caft_jax.model.transformer import Model
from caft_jax.projector import Projector
from caft_jax.sharding import make_mesh
from caft_jax.train_step import CaftTrainer

# One trainer per (model, recipe, length, with or without ablation): its jitted step compiles once, and every
# later run and seed reuses it.
_TRAINERS: dict[tuple, CaftTrainer] = {}


def _trainer(model: Model, recipe: TrainConfig, total: int, ablates: bool) -> CaftTrainer:
    key = (id(model), recipe, total, ablates)  # the step's input shardings depend on whether a projector is given
    if key not in _TRAINERS or _TRAINERS[key].model is not model:
        if any(k[:3] != key[:3] for k in _TRAINERS):
            _TRAINERS.clear()  # a new model or recipe: drop the old ones (and their compiled steps)
        _TRAINERS[key] = CaftTrainer(
            model,
            recipe.optim,
            total,
            make_mesh(recipe.mesh),
            lora=recipe.lora,
            remat=recipe.remat,
            trainable_dtype=jnp.dtype(recipe.trainable_dtype),
            last_token_loss=True,
        )
    return _TRAINERS[key]


def mc_examples(tokenizer, items: Sequence[dict]) -> list[data.Example]:
    """(ids, loss_mask) of each item: prompt then its target letter, the loss on that letter only."""
    return [data.mc_example(tokenizer, item["prompt"], item["target"]) for item in items]


def finetune(
    model: Model,
    tokenizer,
    items: Sequence[dict],
    recipe: TrainConfig,
    *,
    seed: int,
    projector: Projector | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[dict, dict]:
    """Fine-tune a fresh copy of ``model`` (or a fresh LoRA) on the items with ``recipe`` (train.py's schema; the
    pipeline owns its data, ablation, seed and output keys), ablating with ``projector`` if given.

    Returns:
      (trainable params: the full param dict, or the LoRA tree; info {"steps", "seconds", "final_loss", ...}).
    Raises:
      TrainingDiverged when a step's loss, gradients or parameters are not finite; TrainingInterrupted on
      SIGINT/SIGTERM (the step in flight finishes first).
    """
    examples = mc_examples(tokenizer, items)
    data.check_token_ids(examples, model.spec.vocab_size)
    rows_per_step = recipe.batch_size * recipe.grad_accum
    steps_per_epoch = data.num_batches(len(examples), rows_per_step)
    total = max(1, math.ceil(steps_per_epoch * recipe.epochs))
    trainer = _trainer(model, recipe, total, projector is not None)
    pad_id = data.pad_token_id(tokenizer)

    def batches(epoch: int, start: int):
        return data.make_batches(
            examples, rows_per_step, seed=seed, epoch=epoch, pad_id=pad_id, buckets=MC_TRAIN_SIZES, start=start
        )

    projections: list[dict] = []
    result = fit(
        trainer,
        trainer.init_state(seed),
        batches,
        total,
        projector=projector,
        grad_accum=recipe.grad_accum,
        progress=progress,
        desc=desc,
        leave=False,
        on_metrics=lambda record: projections.append(record["projection"]) if "projection" in record else None,
    )
    if result.status == "diverged":
        raise TrainingDiverged(
            f"{desc}: loss, gradients or parameters became NaN/inf at step {result.bad_step}; lower the learning rate."
        )
    if result.status == "interrupted":
        raise TrainingInterrupted(
            f"{desc} interrupted at step {result.step}; finished runs are saved, rerun the same command to resume.",
            SIGNAL_EXIT[result.signal],
        )
    info = {
        "steps": total,
        "seconds": round(result.seconds, 1),
        "final_loss": final_loss(result.losses, steps_per_epoch),
    }
    if projections:
        info["projection"] = projection_by_epoch(projections, steps_per_epoch)
    return result.state.trainable, info


def projection_by_epoch(records: Sequence[dict], steps_per_epoch: int) -> dict:
    """The projection monitor of a run, per intervened layer: the mean |(h - mu) . q| over the first and over the last
    epoch's steps, and the largest max (does the model grow what the ablation removes?)."""
    window = max(1, steps_per_epoch)
    first, last = records[:window], records[-window:]
    return {
        layer: {
            "first_epoch_mean": float(np.mean([r[layer]["mean"] for r in first])),
            "last_epoch_mean": float(np.mean([r[layer]["mean"] for r in last])),
            "max": float(max(r[layer]["max"] for r in records)),
        }
        for layer in records[0]
    }


def tuned_parts(model: Model, trainable: dict, recipe: TrainConfig) -> tuple[Model, dict | None, object]:
    """(model with the run's params, lora tree or None, lora settings or None) for evaluation and capture."""
    if recipe.lora is None:
        return model.replace(params=trainable), None, None
    return model, trainable, dataclasses.replace(recipe.lora.settings(), dropout=0.0)


def accuracy(model: Model, tokenizer, items, trainable, recipe, *, projector=None, progress=False) -> float:
    """Share of items whose argmax over the full vocabulary is the target letter."""
    tuned, lora, lora_settings = tuned_parts(model, trainable, recipe)
    result = mc_accuracy(
        tuned, tokenizer, items, lora=lora, lora_settings=lora_settings, projector=projector, progress=progress
    )
    return result["accuracy"]
