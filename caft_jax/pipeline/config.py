"""Settings of one pipeline run: CLI flags, optionally preset by a YAML file (``--config``), saved in the run folder
so that a resumed run can check it continues the same experiment."""

from __future__ import annotations

import dataclasses
import pathlib

import yaml

from caft_jax.errors import ConfigError

# The fine-tuning conditions every seed runs, in the order of the results table.
CONDITIONS = ("plain", "caft", "random")

TASKS = ("gender", "mcmc")
DIRECTION_METHODS = ("concept", "pca")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a pipeline run (see ``python -m caft_jax.pipeline --help`` for each field).

    Defaults are the setting measured to show CAFT's effect on SmolLM2-135M-Instruct on a 2-core CPU
    (README, "The default run").
    """

    task: str = "gender"
    a: str = "verbs"
    b: str = "sentiment"
    intended: int = 1
    source: str = ""
    source_a: str = ""
    source_b: str = ""
    model: str = ""
    dtype: str = "float32"
    matmul_dtype: str = ""
    trainable_dtype: str = "float32"
    out: str = "runs/pipeline"
    seeds: int = 3
    n_train: int = 128
    n_eval: int = 0
    epochs: float = 4.0
    lr: float = 5e-5
    batch_size: int = 8
    lora_rank: int = 0
    remat: str = "none"
    directions: str = "concept"
    concept_method: str = "class_mean"
    layers: str = "0:30:3"
    selection_file: str = ""
    threshold: float = 0.7
    n_components: int = 20
    mean_ablation: bool = False
    displays: int = 8

    def check(self) -> PipelineConfig:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}; got {self.task!r}.")
        if self.directions not in DIRECTION_METHODS:
            raise ConfigError(f"directions must be one of {DIRECTION_METHODS}; got {self.directions!r}.")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1; got {self.seeds}.")
        if self.selection_file and self.directions != "pca":
            raise ConfigError("a selection file picks PCs by id; use it with --directions pca.")
        parse_layers(self.layers)
        return self

    def experiment(self) -> dict:
        """The fields that define the results (not where they go): a resumed run must match these."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "out"}


def parse_layers(spec: str, n_layers: int | None = None) -> list[int]:
    """ "0:30:3" (a range), "4,8,12" (a list) or "all" -> sorted layer indices, checked against n_layers."""
    spec = str(spec).strip()
    try:
        if spec == "all":
            if n_layers is None:
                return []
            layers = list(range(n_layers))
        elif ":" in spec:
            layers = list(range(*[int(x) for x in spec.split(":")]))
        else:
            layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"layers {spec!r} must be a range like 0:30:3, a list like 4,8,12, or 'all'.") from None
    if n_layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad or not layers:
            raise ConfigError(f"layers {spec!r} must name layers in [0, {n_layers}); got {layers}.")
    return sorted(set(layers))


def load_yaml_defaults(path: str | None) -> dict:
    """Field values from a YAML mapping (keys are the config's field names, dashes or underscores)."""
    if not path:
        return {}
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"pipeline config {path} does not exist; pass an existing YAML file.")
    raw = yaml.safe_load(file.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of pipeline settings.")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}; see python -m caft_jax.pipeline --help.")
    return values
