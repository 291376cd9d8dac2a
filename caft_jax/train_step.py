"""The CAFT training step: next-token loss under the ablation projector, sharded and jitted.

One step = gradient accumulation over micro-batches (a ``lax.scan``), a token-weighted mean loss over the whole
accumulated batch, then clip + AdamW. LoRA mode differentiates only the LoRA tree (the base params are a frozen,
non-donated input); full fine-tuning is the same step with the whole parameter tree trainable. A step whose loss
or gradients are not finite leaves the state unchanged and reports ``finite = False``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from caft_jax.errors import ConfigError
from caft_jax.lora import LoraConfig, init_lora
from caft_jax.model.transformer import Model, forward, lm_head
from caft_jax.optim import OptimConfig, learning_rate_schedule, make_optimizer
from caft_jax.projector import Projector
from caft_jax.sharding import RULES, replicated, tree_shardings

BATCH_KEYS = ("tokens", "attn_mask", "loss_mask")
PACKED_BATCH_KEYS = BATCH_KEYS + ("segment_ids",)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed): step, trainable params, optimiser state, RNG."""

    step: jax.Array
    trainable: dict
    opt_state: Any
    rng: jax.Array


def target_mask(loss_mask: jax.Array) -> jax.Array:
    """Which positions' logits carry a loss: position j predicts token j + 1. loss_mask [..., t] -> bool [..., t]."""
    return jnp.concatenate([loss_mask[..., 1:], jnp.zeros_like(loss_mask[..., :1])], axis=-1)


def token_losses(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over masked targets, and the number of targets.

    logits [b, t, V] (position j predicts token j + 1); tokens [b, t]; loss_mask [b, t] marks target tokens.
    The targets are shifted instead of the logits: slicing logits[:, :-1] copied the largest tensor of the step
    (and padded its gradient back), ~4% of a SmolLM2 LoRA step on CPU. The last position has no target.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [b, t]
    mask = target_mask(loss_mask)  # [b, t]
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # [b, t]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask.astype(jnp.float32))


def last_token_losses(model: Model, hidden: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    """``token_losses`` when only the last column is a target: hidden [b, t, d] (pre-norm), tokens/loss_mask [b, t]."""
    logits = lm_head(model, hidden[:, -2])  # [b, V]
    target_logit = jnp.take_along_axis(logits, tokens[:, -1:], axis=-1)[:, 0]
    mask = loss_mask[:, -1].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # [b]
    return jnp.sum(nll * mask), jnp.sum(mask)


def intervention_mask(projector: Projector | None, batch: dict) -> jax.Array | None:
    """The positions [b, t] the projector acts on, by its token rule (None: every position)."""
    if projector is None or projector.positions == "all":
        return None
    if projector.positions == "response":  # the trained tokens
        return batch["loss_mask"]
    return batch["attn_mask"] & ~batch["loss_mask"]  # the prompt: attended, not trained


@dataclasses.dataclass
class CaftTrainer:
    """Builds and runs the sharded CAFT train step for one model and recipe.

    Args:
      model: the base model (params already placed, e.g. by ``load_model(..., mesh=mesh)``).
      optim: optimiser recipe; total_steps: optimiser steps in the run (for the schedule).
      lora: LoRA config, or None for full fine-tuning.
      mesh: (data, fsdp, tp) mesh.
      trainable_dtype: dtype of trainable params and optimiser moments (float32 master weights by default).
      remat: per-layer rematerialisation policy ("none" | "full" | "dots").
      last_token_loss: the loss is on each row's last token only (multiple-choice answers, left-padded), so the LM
        head runs on one position per row instead of all of them; same value as the masked token loss.
      packed: batches hold several examples per row with ``segment_ids`` (``data.make_packed_batches``).
    """

    model: Model
    optim: OptimConfig
    total_steps: int
    mesh: Mesh
    lora: LoraConfig | None = None
    trainable_dtype: Any = jnp.float32
    remat: str = "none"
    last_token_loss: bool = False
    packed: bool = False

    def __post_init__(self):
        if self.packed and self.last_token_loss:
            raise ConfigError(
                "packing puts several examples in a row, so the last column is not each example's answer; turn off "
                "data.pack for multiple-choice data (its rows are short and bucketed already)."
            )
        self.batch_keys = PACKED_BATCH_KEYS if self.packed else BATCH_KEYS
        self.tx = make_optimizer(self.optim, self.total_steps)
        self.schedule = learning_rate_schedule(self.optim, self.total_steps)
        self._step_fns = {}  # one jitted step per projector structure (None, and each site / gradient / positions)

    # ---- state -------------------------------------------------------------------------------------------
    def frozen_params(self) -> dict | None:
        """The base params the step reads but never updates (LoRA mode), else None."""
        return self.model.params if self.lora is not None else None

    def init_state(self, seed: int = 0) -> TrainState:
        """Fresh trainable tree (new LoRA, or a float copy of the base params) and optimiser state, sharded."""
        if self.lora is not None:
            trainable = init_lora(self.model, self.lora, seed=seed, dtype=self.trainable_dtype)
        else:
            # A copy even when the dtype already matches: the state is donated to the step, and an alias would
            # delete the base model's own params with it.
            trainable = jax.tree.map(lambda x: jnp.array(x, dtype=self.trainable_dtype, copy=True), self.model.params)
        trainable = jax.device_put(trainable, tree_shardings(trainable, self.mesh))
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_state_shardings(trainable))(trainable)
        return TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh)),
            trainable=trainable,
            opt_state=opt_state,
            rng=jax.device_put(jax.random.PRNGKey(seed + 1), replicated(self.mesh)),
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the train state, without allocating it (for checkpoint restore)."""
        state = jax.eval_shape(lambda: self._abstract_init())
        shardings = self.state_shardings(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

    def _abstract_init(self) -> TrainState:
        if self.lora is not None:
            trainable = init_lora(self.model, self.lora, dtype=self.trainable_dtype)
        else:
            trainable = jax.tree.map(lambda x: jnp.zeros(x.shape, self.trainable_dtype), self.model.params)
        return TrainState(jnp.zeros((), jnp.int32), trainable, self.tx.init(trainable), jax.random.PRNGKey(0))

    # ---- shardings ---------------------------------------------------------------------------------------
    def opt_state_shardings(self, trainable):
        return tree_shardings(jax.eval_shape(self.tx.init, trainable), self.mesh)

    def state_shardings(self, state: TrainState) -> TrainState:
        rep = replicated(self.mesh)
        return TrainState(
            step=rep,
            trainable=tree_shardings(state.trainable, self.mesh),
            opt_state=tree_shardings(state.opt_state, self.mesh),
            rng=rep,
        )

    def batch_sharding(self) -> NamedSharding:
        """Batches are [accum, micro_batch, seq]: rows split over the data and fsdp axes."""
        return NamedSharding(self.mesh, PartitionSpec(None, RULES["batch"], None))

    def check_batch(self, batch: dict) -> None:
        rows = batch["tokens"].shape[1]
        split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if rows % split:
            raise ConfigError(
                f"micro-batch of {rows} rows does not divide over data*fsdp={split} devices; "
                f"make the per-step batch size a multiple of {split}."
            )

    # ---- the step ----------------------------------------------------------------------------------------
    def loss_and_grads(self, trainable, frozen, batch, projector, rng):
        """(loss, target count, gradients) of ``loss_grads_and_stats``."""
        return self.loss_grads_and_stats(trainable, frozen, batch, projector, rng)[:3]

    def loss_grads_and_stats(self, trainable, frozen, batch, projector, rng):
        """Token-mean loss over all micro-batches of `batch` ([accum, b, t] arrays), target count, gradients, and
        the intervention's projection stats [n_layers, 2] (mean over micro-batches of the mean, max of the max;
        None without a projector).

        The target count comes from the loss masks before the forward, so each micro-batch differentiates its share
        of the mean directly: the gradients need no division pass afterwards (for full fine-tuning that pass
        reads and writes every parameter's gradient). One micro-batch runs without the accumulation scan, whose
        zero-filled accumulators would be another such pass.
        """
        lora_settings = self.lora.settings() if self.lora is not None else None
        targets = batch["loss_mask"][..., -1] if self.last_token_loss else target_mask(batch["loss_mask"])
        count = jnp.sum(targets.astype(jnp.float32))
        denom = jnp.maximum(count, 1.0)

        def micro_loss(trainable, micro, key):
            params, lora = (frozen, trainable) if self.lora is not None else (trainable, None)
            model = self.model.replace(params=params)
            out = forward(
                model,
                micro["tokens"],
                attn_mask=micro["attn_mask"],
                projector=projector,
                lora=lora,
                lora_settings=lora_settings,
                remat=self.remat,
                rng=key if (lora_settings and lora_settings.dropout) else None,
                logits=not self.last_token_loss,
                segment_ids=micro.get("segment_ids"),
                intervention_mask=intervention_mask(projector, micro),
            )
            if self.last_token_loss:  # position t-2 predicts the last token, the answer
                loss_sum, _ = last_token_losses(model, out.hidden, micro["tokens"], micro["loss_mask"])
            else:
                loss_sum, _ = token_losses(out.logits, micro["tokens"], micro["loss_mask"])
            return loss_sum / denom, out.intervention_stats

        accum = batch["tokens"].shape[0]
        keys = jax.random.split(rng, accum)
        micro_batches = {k: batch[k] for k in self.batch_keys}
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (loss, stats), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], micro_batches), keys[0])
        else:

            def accumulate(carry, xs):
                loss, grads = carry
                (part, part_stats), g = grad_fn(trainable, *xs)
                return (loss + part, jax.tree.map(jnp.add, grads, g)), part_stats

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
            (loss, grads), stats = jax.lax.scan(accumulate, (0.0, zeros), (micro_batches, keys))
            if stats is not None:  # [accum, n_layers, 2] -> [n_layers, 2]
                stats = jnp.stack([stats[..., 0].mean(0), stats[..., 1].max(0)], axis=-1)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
        return loss, count, grads, stats

    def _step(self, state: TrainState, frozen, batch, projector: Projector | None):
        rng, step_rng = jax.random.split(state.rng)
        loss, count, grads, stats = self.loss_grads_and_stats(state.trainable, frozen, batch, projector, step_rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)  # a bad step changes nothing
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "lr": self.schedule(state.step),
            "finite": finite,
        }
        if stats is not None:
            metrics["projection"] = stats
        return new, metrics

    def compiled_step(self, state: TrainState, projector: Projector | None):
        """The jitted step with explicit in/out shardings; the train state is donated, frozen params are not.

        The projector's static fields (site, gradient mode, token rule) are part of its sharding tree, so each
        combination gets its own jitted function; new projector values of one structure reuse it."""
        key = jax.tree.structure(projector)
        if key not in self._step_fns:
            state_sh = self.state_shardings(state)
            frozen = self.frozen_params()
            frozen_sh = None if frozen is None else tree_shardings(frozen, self.mesh)
            batch_sh = {k: self.batch_sharding() for k in self.batch_keys}
            proj_sh = None if projector is None else jax.tree.map(lambda _: replicated(self.mesh), projector)
            self._step_fns[key] = jax.jit(
                self._step,
                in_shardings=(state_sh, frozen_sh, batch_sh, proj_sh),
                out_shardings=(state_sh, replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._step_fns[key]

    def place_batch(self, batch: dict) -> dict:
        """Host numpy batch -> global sharded arrays. Each process passes its own rows (multi-host)."""
        sharding = self.batch_sharding()
        out = {}
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise ConfigError(f"the batch has no {', '.join(missing)}; packed training needs data.make_packed_batches.")
        for k in self.batch_keys:
            local = np.asarray(batch[k])
            global_shape = (local.shape[0], local.shape[1] * jax.process_count(), *local.shape[2:])
            out[k] = jax.make_array_from_process_local_data(sharding, local, global_shape)
        self.check_batch(out)
        return out

    def step(self, state: TrainState, batch: dict, projector: Projector | None = None):
        """One optimiser step on `batch` (host arrays [accum, b, t] or already-placed global arrays)."""
        if isinstance(batch["tokens"], np.ndarray):
            if self.last_token_loss and np.asarray(batch["loss_mask"])[..., :-1].any():
                raise ConfigError(
                    "last_token_loss is on but the batch has loss targets before its last column; use it only for "
                    "left-padded multiple-choice data (one answer token per row)."
                )
            batch = self.place_batch(batch)
        if projector is not None:
            projector = jax.device_put(projector, replicated(self.mesh))
        with jax.set_mesh(self.mesh):  # lets the forward pin activation shardings (caft_jax.sharding.constrain)
            return self.compiled_step(state, projector)(state, self.frozen_params(), batch, projector)
