"""Optimiser and learning-rate schedule (optax), matching the HF Trainer / torch recipes CAFT was run with."""

from __future__ import annotations

import dataclasses

import optax

from caft_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then linear decay to 0 (HF ``get_scheduler("linear")``) or a constant rate.

    Attributes:
      lr: peak learning rate.
      betas, eps, weight_decay: AdamW (decoupled weight decay on every trainable leaf, as torch.optim.AdamW on
        model.parameters() does in the authors' spurious-task code).
      warmup_steps: linear warmup length in optimiser steps; or
      warmup_ratio: warmup as a fraction of the total steps (used when warmup_steps is None).
      schedule: "linear" (decay to 0 at the last step) or "constant" (after warmup).
      clip_norm: global gradient-norm clipping (None or 0 disables; HF's default is 1.0).
    """

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    clip_norm: float | None = 1.0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.schedule not in ("linear", "constant"):
            raise ConfigError(f"optim.schedule must be 'linear' or 'constant', got {self.schedule!r}.")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}.")

    def warmup(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(round(self.warmup_ratio * total_steps))


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step) for optimiser steps 0..total_steps-1, as HF computes it (step 0 of a warmup has lr 0)."""
    warmup = cfg.warmup(total_steps)
    total = max(total_steps, 1)

    def schedule(step):
        import jax.numpy as jnp

        step = jnp.asarray(step, jnp.float32)
        ramp = step / max(warmup, 1) if warmup else 1.0
        if cfg.schedule == "constant":
            decay = 1.0
        else:
            decay = jnp.maximum(0.0, (total - step) / max(total - warmup, 1))
        return cfg.lr * jnp.where(step < warmup, ramp, decay)

    return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip -> AdamW(schedule). Moments are kept in the trainable params' dtype (float32 master weights)."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg, total_steps),
            b1=cfg.betas[0],
            b2=cfg.betas[1],
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*parts)
