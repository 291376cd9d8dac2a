"""Run configuration: YAML files plus ``key=value`` overrides, resolved into frozen dataclasses.

A config file is a nested mapping whose sections match ``TrainConfig``'s fields; unknown keys are errors (a typo
must not silently fall back to a default). Overrides use dotted keys, e.g. ``optim.lr=2e-5 lora=null``; values
are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from caft_jax.errors import ConfigError
from caft_jax.lora import LoraConfig
from caft_jax.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data.

    Attributes:
      train: path of a JSONL file: chat records {"messages": [...]} or multiple-choice {"prompt", "target"}.
      format: "chat" (loss on assistant tokens) or "mc" (loss on the answer letter after the prompt).
      max_len: sequences are truncated to this many tokens.
      em_format: chat only: the authors' emergent-misalignment text format (generation prompt + answer + eos).
      holdout_fraction: fraction of records held out (the authors' EM release holds out 10%).
      limit: use only the first N records (0 = all).
    """

    train: str = ""
    format: str = "chat"
    max_len: int = 2048
    em_format: bool = False
    holdout_fraction: float = 0.0
    limit: int = 0


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """The concept-ablation spec used during training (none = plain fine-tuning).

    Attributes:
      spec: path of a directions file (see caft_jax.ablation_spec), or "" for no ablation.
      layers: the layers the recipe ablates; when set, a spec with directions elsewhere is an error.
      site: "resid_post" (the authors' hook site) or "resid_mid".
      k_max: padded width of the projector stack (default: the largest number of directions of a layer).
      mean_ablation: use the spec's per-layer means as offsets (if it has them).
    """

    spec: str = ""
    layers: tuple[int, ...] = ()
    site: str = "resid_post"
    k_max: int | None = None
    mean_ablation: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 2
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything train.py needs. Sizes are global (over all devices and processes).

    Attributes:
      model: local HF model directory or .gguf file.
      dtype: compute dtype ("bfloat16" or "float32"); base_dtype: storage dtype of frozen base params.
      trainable_dtype: dtype of trainable params and optimiser moments.
      lora: LoRA settings, or None for full fine-tuning.
      batch_size: rows per micro-batch; grad_accum: micro-batches per optimiser step.
      epochs: passes over the data (fractions allowed, e.g. 0.25 stops after a quarter epoch).
      mesh: (data, fsdp, tp) shape; -1 takes the remaining devices.
      remat: "none" | "full" | "dots".
      output_dir: metrics, checkpoints and exports go here.
      export: "peft", "merged", "both" or "none" at the end of training.
    """

    model: str = ""
    dtype: str = "float32"
    base_dtype: str | None = None
    trainable_dtype: str = "float32"
    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    ablation: AblationConfig = dataclasses.field(default_factory=AblationConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    batch_size: int = 2
    grad_accum: int = 1
    epochs: float = 1.0
    seed: int = 0
    mesh: tuple[int, int, int] = (1, -1, 1)
    remat: str = "none"
    output_dir: str = "runs/train"
    export: str = "peft"
    log_every: int = 1
    max_steps: int = 0


_SECTIONS = {
    "lora": LoraConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "ablation": AblationConfig,
    "checkpoint": CheckpointConfig,
}


def _coerce(value):
    """YAML 1.1 reads `1e-5` (no dot) as a string; treat numeric-looking strings as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in values and "float" in str(f.type):
            values[f.name] = _coerce(values[f.name])
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"Unknown config key(s) {', '.join(where + k for k in unknown)}; valid: {sorted(names)}.")
    for key in ("betas", "targets", "mesh", "layers"):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])
    return cls(**values)


def config_from_dict(raw: dict) -> TrainConfig:
    """TrainConfig from a nested dict (a parsed YAML file with overrides applied)."""
    raw = dict(raw)
    for name, cls in _SECTIONS.items():
        if name in raw:
            section = raw[name]
            if section is None and name == "lora":
                raw[name] = None
            elif isinstance(section, dict):
                raw[name] = _build(cls, dict(section), f"{name}.")
            else:
                raise ConfigError(f"Config section {name!r} must be a mapping, got {section!r}.")
    return _build(TrainConfig, raw, "")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (YAML-parsed values) to a nested dict."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. optim.lr=2e-5).")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (optional) and apply overrides."""
    raw: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {path} does not exist; pass --config configs/<name>.yaml.")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"Config file {path} is not valid YAML ({e}).") from e
    return config_from_dict(apply_overrides(raw, list(overrides)))


def config_to_dict(cfg: TrainConfig) -> dict:
    """JSON/YAML-serialisable form of a resolved config (stored in checkpoints and run directories)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
