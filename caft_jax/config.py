"""Run configuration: YAML files plus ``key=value`` overrides, resolved into frozen dataclasses.

A config file is a nested mapping whose sections match ``TrainConfig``'s fields; unknown keys are errors (a typo
must not silently fall back to a default). Overrides use dotted keys, e.g. ``optim.lr=2e-5 lora=null``; values
are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
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
      pack: chat only: several records per row (segment ids; attention and positions per record), so rows carry
        no padding; batch_size then counts rows.
      pack_len: length of the packed rows (0: the smallest bucket that holds the longest record); longer records
        get rows of their own bucket. Shorter rows cut the attention's cost per token (a row's attention is
        causal over the whole row, and most of it is masked between records).
    """

    train: str = ""
    format: str = "chat"
    max_len: int = 2048
    em_format: bool = False
    holdout_fraction: float = 0.0
    limit: int = 0
    pack: bool = False
    pack_len: int = 0


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """The concept-ablation spec used during training (none = plain fine-tuning).

    Attributes:
      spec: path of a directions file (see caft_jax.ablation_spec), or "" for no ablation.
      layers: the layers the recipe ablates; when set, a spec with directions elsewhere is an error.
      site: "resid_post" (the authors' hook site) or "resid_mid".
      k_max: padded width of the projector stack (default: the largest number of directions of a layer).
      mean_ablation: use the spec's per-layer means as offsets (if it has them).
      strength: alpha of a partial ablation h - alpha ((h - mu) Q) Q^T (1 = CAFT, 0 = no ablation).
      steer_coeff: preventative steering: add c times each spec layer's first direction (unit length); 0 = none.
      gradient: "through" (CAFT), "detached" (ablated forward, unprojected gradient) or "gradient_only" (plain
        forward, projected gradient).
      positions: the tokens the intervention acts on: "all", "prompt" or "response" (the trained tokens).
    """

    spec: str = ""
    layers: tuple[int, ...] = ()
    site: str = "resid_post"
    k_max: int | None = None
    mean_ablation: bool = True
    strength: float = 1.0
    steer_coeff: float = 0.0
    gradient: str = "through"
    positions: str = "all"


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
      dtype: compute dtype of activations ("bfloat16" or "float32"); base_dtype: storage dtype of frozen base
        params; matmul_dtype: operand dtype of every product, accumulated in float32 (null: dtype). dtype float32
        with matmul_dtype bfloat16 is the mixed precision for CPUs with bf16 matrix units (AMX); accelerators
        usually take dtype bfloat16.
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
    matmul_dtype: str | None = None
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


DTYPES = ("float32", "bfloat16")
# Values a key may take (None: the key may be null), checked before anything is loaded.
CHOICES = {
    "dtype": DTYPES,
    "base_dtype": (None, *DTYPES),
    "matmul_dtype": (None, *DTYPES),
    "trainable_dtype": DTYPES,
    "remat": ("none", "full", "dots"),
    "export": ("peft", "merged", "both", "none"),
    "data.format": ("chat", "mc"),
    "ablation.site": ("resid_post", "resid_mid"),
    "ablation.gradient": ("through", "detached", "gradient_only"),
    "ablation.positions": ("all", "prompt", "response"),
}
# (lowest allowed value, whether the bound itself is allowed)
LOWER_BOUNDS = {
    "batch_size": (1, True),
    "grad_accum": (1, True),
    "epochs": (0, False),
    "log_every": (1, True),
    "max_steps": (0, True),
    "data.max_len": (2, True),
    "data.limit": (0, True),
    "data.pack_len": (0, True),
    "data.holdout_fraction": (0, True),
    "checkpoint.every": (1, True),
    "checkpoint.keep": (1, True),
    "ablation.k_max": (1, True),
    "optim.eps": (0, False),
    "optim.weight_decay": (0, True),
    "optim.warmup_steps": (0, True),
    "optim.warmup_ratio": (0, True),
    "optim.clip_norm": (0, False),
    "lora.alpha": (0, False),
}


def _type_problem(value, hint) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it fits)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"a list, got {value!r}"
        element_types = args[:1] if (len(args) == 2 and args[1] is Ellipsis) else args
        if len(element_types) != len(args) or len(args) == len(value):
            for i, item in enumerate(value):
                problem = _type_problem(item, element_types[min(i, len(element_types) - 1)])
                if problem:
                    return f"a list of {_type_name(element_types[0])}, but item {i} is {item!r}"
            return None
        return f"a list of {len(args)} values, got {len(value)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"a string, got {value!r}"
    return None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _check_values(cls, values: dict, where: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        name = where + key
        if dataclasses.is_dataclass(value):
            continue
        problem = _type_problem(value, hints[key])
        if problem:
            raise ConfigError(f"{name} must be {problem}; fix it in the config or override it ({name}=...).")
        if name in CHOICES and value not in CHOICES[name]:
            allowed = ", ".join("null" if c is None else c for c in CHOICES[name])
            raise ConfigError(f"{name} must be one of {allowed}; got {value!r}.")
        if name in LOWER_BOUNDS and value is not None:
            bound, inclusive = LOWER_BOUNDS[name]
            if value < bound or (value == bound and not inclusive):
                raise ConfigError(f"{name} must be {'>=' if inclusive else '>'} {bound}; got {value!r}.")


def _build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in values and "float" in str(f.type):
            values[f.name] = _coerce(values[f.name])
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"Unknown config key(s) {', '.join(where + k for k in unknown)}; valid: {sorted(names)}.")
    _check_values(cls, values, where)
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
