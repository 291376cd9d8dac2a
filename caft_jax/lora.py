"""LoRA as its own pytree beside the frozen base parameters.

The LoRA tree mirrors the model's layer stack: ``{"attn"|"mlp": {kernel: {"a": [L, in, r], "b": [L, r, out]}}}``.
The forward adds ``scale * dropout(x) @ A @ B`` to each targeted projection; the base params are never
differentiated, so gradients and optimiser state exist only for this tree.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from caft_jax.errors import ConfigError
from caft_jax.model.layers import LORA_TARGETS, LoraSettings
from caft_jax.model.transformer import Model


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (PEFT semantics).

    Attributes:
      rank: r.
      alpha: lora_alpha.
      rslora: scale alpha / sqrt(r) (rsLoRA, the CAFT recipe) instead of alpha / r.
      dropout: dropout on the LoRA input during training.
      targets: among q, k, v, o, gate, up, down.
    """

    rank: int = 32
    alpha: float = 64.0
    rslora: bool = True
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets {unknown or '[]'} are invalid; choose among {', '.join(LORA_TARGETS)}.")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def settings(self) -> LoraSettings:
        return LoraSettings(scale=self.scale, dropout=self.dropout)


def init_lora(model: Model, cfg: LoraConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """New LoRA weights: A ~ Kaiming-uniform (PEFT's default, bound 1/sqrt(in)), B = 0, so step 0 = base model."""
    key = jax.random.PRNGKey(seed)
    lora: dict = {}
    for i, target in enumerate(cfg.targets):
        sub, name = LORA_TARGETS[target]
        n_layers, d_in, d_out = model.params["layers"][sub][name].shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
        a = jax.random.uniform(jax.random.fold_in(key, i), (n_layers, d_in, cfg.rank), jnp.float32, -bound, bound)
        lora.setdefault(sub, {})[name] = {"a": a.astype(dtype), "b": jnp.zeros((n_layers, cfg.rank, d_out), dtype)}
    return lora


def lora_param_count(model: Model, cfg: LoraConfig) -> int:
    """Trainable LoRA parameters by formula: sum over targets of n_layers * r * (in + out)."""
    total = 0
    for target in cfg.targets:
        sub, name = LORA_TARGETS[target]
        n_layers, d_in, d_out = model.params["layers"][sub][name].shape
        total += n_layers * cfg.rank * (d_in + d_out)
    return total


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Base params with W + scale * A @ B folded into every targeted kernel (computed in float32)."""
    merged = jax.tree.map(lambda x: x, params)
    for sub, kernels in lora.items():
        for name, ab in kernels.items():
            w = params["layers"][sub][name]
            delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
            merged["layers"][sub][name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return merged
