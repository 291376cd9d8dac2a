"""Settings of one pipeline run: the experiment (task, directions, seeds, ...) and the fine-tuning recipe.

The recipe is train.py's own schema (``caft_jax.config.TrainConfig``: same keys, same validation, same defaults),
under the ``train`` key of a pipeline YAML file and as ``train.<key>=value`` overrides on the command line; the
pipeline starts it from ``DEFAULT_RECIPE``. Both halves are stored in the run folder's manifest, so that a resumed
run can check it continues the same experiment.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import yaml

from caft_jax.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict
from caft_jax.errors import ConfigError

# The fine-tuning conditions a seed may run, in the order of the results table: plain fine-tuning, CAFT, the
# random-direction baseline, and the family's variants with the same directions: CAFT with a detached projection
# (ablated forward, unprojected gradient), gradient-only ablation (plain forward, projected gradient), and
# preventative steering (add c times the direction, c searched on the validation split).
CONDITIONS = ("plain", "caft", "random", "caft_detached", "caft_gradient_only", "steer")
DEFAULT_CONDITIONS = "plain,caft,random"
# A condition other than plain may name the selection whose directions it uses, as ``caft@top5``: ``probe`` (the
# default: the probe-guided rule for PCA, the supervised concept directions otherwise), ``top<k>`` (the first k PCs
# at every discovery layer, the authors' "top PCs" baseline), or a name given in --selection-file (a person's or an
# LLM's choice). ``random@top5`` is the random baseline with top5's count per layer.
DEFAULT_SELECTION = "probe"
TOP_K_SELECTION = re.compile(r"top([1-9][0-9]*)")
FILE_SELECTION_NAME = re.compile(r"[a-z][a-z0-9_]*")

TASKS = ("gender", "mcmc")
DIRECTION_METHODS = ("concept", "pca")
# auto: class_mean for a two-valued spurious concept, leace (rank = values - 1) for more
CONCEPT_METHODS = ("auto", "class_mean", "leace", "inlp")

# The pipeline's recipe: the authors' spurious-task AdamW and schedule (caft_method.md 1.5(b): betas (0.9, 0.95),
# weight decay 0.01, 50% linear warmup then linear decay), full fine-tuning, with the learning rate, batch and
# epochs measured to show CAFT's effect on SmolLM2-135M-Instruct on a 2-core CPU (README, "The default run").
# Every other value is TrainConfig's default.
DEFAULT_RECIPE = {
    "lora": None,
    "optim": {"lr": 5e-5, "betas": [0.9, 0.95], "weight_decay": 0.01, "warmup_ratio": 0.5},
    "batch_size": 8,
    "epochs": 4.0,
}
# Recipe keys the pipeline decides itself: its data are the task's items (last-position loss on the answer
# letter), its directions come from discovery (--layers, --mean-ablation), seeds are its loop, and its runs are
# scored in process under --out rather than checkpointed and exported.
PIPELINE_OWNS = {
    "data": "the task's items",
    "ablation": "discovery (--directions, --layers, --mean-ablation)",
    "seed": "--seeds",
    "output_dir": "--out",
    "export": "the run folder (runs are scored in process)",
    "checkpoint": "the run folder (each finished run is saved)",
    "log_every": "the progress bar",
    "max_steps": "train.epochs",
}
# Flags that set a recipe value (the long option name -> its dotted key in the recipe).
RECIPE_FLAGS = {
    "model": "model",
    "dtype": "dtype",
    "matmul_dtype": "matmul_dtype",
    "trainable_dtype": "trainable_dtype",
    "epochs": "epochs",
    "lr": "optim.lr",
    "batch_size": "batch_size",
    "remat": "remat",
}


def default_recipe() -> TrainConfig:
    return config_from_dict(DEFAULT_RECIPE)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a pipeline run (see ``python -m caft_jax.pipeline --help`` for each field).

    ``train`` is the fine-tuning recipe of every condition (train.py's TrainConfig, from DEFAULT_RECIPE).
    """

    task: str = "gender"
    a: str = "verbs"
    b: str = "sentiment"
    intended: int = 1
    source: str = ""
    source_a: str = ""
    source_b: str = ""
    out: str = "runs/pipeline"
    seeds: int = 3
    n_train: int = 128
    n_eval: int = 0
    directions: str = "concept"
    concept_method: str = "auto"
    layers: str = "0:30:3"
    selection_file: str = ""
    threshold: float = 0.7
    permutations: int = 1000  # pca: label shuffles behind each layer's chance-level AUC (0: the fixed threshold only)
    n_components: int = 20
    mean_ablation: bool = False
    displays: int = 8
    conditions: str = DEFAULT_CONDITIONS
    steer_coeffs: str = "4,16,64"
    keep_plain: bool = False  # export the plain seed-0 fine-tune for rankings outside the pipeline (~4 bytes/param)
    train: TrainConfig = dataclasses.field(default_factory=default_recipe)

    def check(self) -> PipelineConfig:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}; got {self.task!r}.")
        if self.directions not in DIRECTION_METHODS:
            raise ConfigError(f"directions must be one of {DIRECTION_METHODS}; got {self.directions!r}.")
        if self.concept_method not in CONCEPT_METHODS:
            raise ConfigError(f"concept_method must be one of {CONCEPT_METHODS}; got {self.concept_method!r}.")
        for name in ("seeds", "displays"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}.")
        for name in ("n_train", "n_eval", "permutations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (all) or a positive count; got {getattr(self, name)}.")
        conditions = self.condition_list()
        if conditions[0] != "plain":
            raise ConfigError("conditions must start with plain: its seed-0 fine-tune is where discovery runs.")
        self.steer_coefficients()
        self.check_selections(conditions)
        parse_layers(self.layers)
        return self

    def condition_list(self) -> list[str]:
        names = [c.strip() for c in self.conditions.split(",") if c.strip()]
        unknown = sorted({n for n in names if split_condition(n)[0] not in CONDITIONS})
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                f"conditions {self.conditions!r} must be distinct names among {', '.join(CONDITIONS)}, each but plain "
                f"optionally with @selection (e.g. caft@top5); got {unknown or names}."
            )
        return names

    def selection_files(self) -> dict[str, str]:
        """--selection-file as {selection name: path}: "picked.json" is named ``file``; "human=a.json,llm=b.json"
        names each."""
        files = {}
        for part in [p.strip() for p in self.selection_file.split(",") if p.strip()]:
            name, equals, path = part.rpartition("=")
            name = name.strip() if equals else "file"
            if not FILE_SELECTION_NAME.fullmatch(name) or name == DEFAULT_SELECTION or TOP_K_SELECTION.fullmatch(name):
                raise ConfigError(
                    f"selection file name {name!r} must be a lower-case word other than probe and top<k>, as in "
                    "--selection-file human=picked.json."
                )
            if name in files:
                raise ConfigError(f"selection file name {name!r} is given twice in --selection-file.")
            files[name] = path.strip()
        return files

    def selections(self) -> list[str]:
        """The selections the conditions use, in first-use order (plain uses none)."""
        used = [split_condition(c)[1] for c in self.condition_list() if c != "plain"]
        return list(dict.fromkeys(used))

    def check_selections(self, conditions: list[str]) -> None:
        files = self.selection_files()
        for condition in conditions:
            base, selection = split_condition(condition)
            if base == "plain" and "@" in condition:
                raise ConfigError(f"condition {condition!r}: plain fine-tuning ablates nothing; write plain.")
            if selection == DEFAULT_SELECTION or selection in files:
                continue
            if TOP_K_SELECTION.fullmatch(selection):
                if self.directions != "pca":
                    raise ConfigError(f"condition {condition!r}: top-k selections pick PCs; use --directions pca.")
                if int(selection[3:]) > self.n_components:
                    raise ConfigError(
                        f"condition {condition!r} needs {selection[3:]} PCs per layer but --n-components is "
                        f"{self.n_components}; lower k or raise --n-components."
                    )
                continue
            named = ", ".join(files) or "none given"
            raise ConfigError(
                f"condition {condition!r}: unknown selection {selection!r}; use probe, top<k> (e.g. top5) or a name "
                f"from --selection-file ({named})."
            )
        unused = sorted(set(files) - set(self.selections()))
        if unused:
            example = ",".join(f"caft@{name}" for name in unused)
            raise ConfigError(
                f"--selection-file {', '.join(unused)} is used by no condition; add {example} (and random@<name> for "
                "its random baseline) to --conditions."
            )

    def steer_coefficients(self) -> list[float]:
        try:
            values = [float(c) for c in self.steer_coeffs.split(",") if c.strip()]
        except ValueError:
            values = []
        if not values:
            raise ConfigError(f"steer_coeffs {self.steer_coeffs!r} must be numbers like 4,16,64.")
        return values

    def experiment(self) -> dict:
        """The values that define the results (not where they go): a resumed run must match these."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("out", "train", "keep_plain")
        }
        recipe = {k: v for k, v in config_to_dict(self.train).items() if k not in PIPELINE_OWNS}
        return {**values, "train": recipe}

    def inputs(self) -> dict[str, str]:
        """Files the run reads by path (fingerprinted by content in the manifest). Selection files are not among
        them: each is checked against the spec it made (caft_jax.pipeline.selections), so one can be added to a
        finished run."""
        return {"source": self.source, "source_a": self.source_a, "source_b": self.source_b}


def split_condition(name: str) -> tuple[str, str]:
    """ "caft@top5" -> ("caft", "top5"); "caft" -> ("caft", "probe")."""
    base, _, selection = name.partition("@")
    return base, selection or DEFAULT_SELECTION


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


def read_yaml_settings(path: str | None) -> dict:
    """The mapping of a pipeline YAML file: experiment keys (dashes or underscores) and a ``train`` recipe section."""
    if not path:
        return {}
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"pipeline config {path} does not exist; pass an existing YAML file.")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline config {path} is not valid YAML ({e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of pipeline settings.")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    check_keys(values, where=str(path))
    return values


def check_keys(values: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    recipe_keys = sorted(k for k in values if k in RECIPE_FLAGS or k == "lora_rank")
    if recipe_keys:
        raise ConfigError(
            f"{where}: {recipe_keys} are fine-tuning recipe values; put them in the train section in train.py's "
            "layout (e.g. train: {optim: {lr: 5.0e-5}, batch_size: 8, lora: null})."
        )
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; see python -m caft_jax.pipeline --help.")
    train = values.get("train")
    if train is not None and not isinstance(train, dict):
        raise ConfigError(f"{where}: train must be a mapping of recipe values (train.py's layout); got {train!r}.")


def resolve(yaml_values: dict, flags: dict, overrides: list[str]) -> PipelineConfig:
    """The run's settings: DEFAULT_RECIPE and the field defaults, then the YAML file, then flags, then overrides.

    Args:
      yaml_values: from read_yaml_settings; flags: experiment field -> value and RECIPE_FLAGS name -> value (None
        = not given); overrides: ``key=value`` strings, ``train.<recipe key>=`` or a pipeline field.
    """
    experiment = {k: v for k, v in yaml_values.items() if k != "train"}
    recipe = apply_overrides(DEFAULT_RECIPE, [])
    recipe = _merge(recipe, yaml_values.get("train") or {})
    for name, value in flags.items():
        if value is None:
            continue
        if name in RECIPE_FLAGS:
            recipe = _set(recipe, RECIPE_FLAGS[name], value)
        elif name == "lora_rank":
            recipe = _set(recipe, "lora", None) if value == 0 else _set(recipe, "lora.rank", value)
        else:
            experiment[name] = value
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.optim.lr=2e-5 or seeds=1).")
        if key.startswith("train."):
            recipe = apply_overrides(recipe, [f"{key[len('train.') :]}={value}"])
        else:
            name = key.replace("-", "_")
            field = PipelineConfig.__dataclass_fields__.get(name)
            # str fields keep the text as typed: YAML would read a layer range like 0:30:3 as a base-60 number
            experiment[name] = value if field is not None and field.type in (str, "str") else yaml.safe_load(value)
    check_keys(experiment, where="settings")
    owned = sorted(k for k in recipe if k in PIPELINE_OWNS)
    if owned:
        reasons = "; ".join(f"train.{k} is set by {PIPELINE_OWNS[k]}" for k in owned)
        raise ConfigError(f"{reasons}: remove {'it' if len(owned) == 1 else 'them'} from the pipeline's recipe.")
    _check_types(experiment)
    return PipelineConfig(**experiment, train=config_from_dict(recipe)).check()


def _set(recipe: dict, dotted: str, value) -> dict:
    """A copy of the nested recipe with ``dotted`` (e.g. "optim.lr") set to value."""
    out = apply_overrides(recipe, [])
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    """base with extra's values (nested mappings merged key by key)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_types(values: dict) -> None:
    defaults = PipelineConfig.__dataclass_fields__
    for key, value in values.items():
        want = type(defaults[key].default)
        if want is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = values[key] = float(value)
            except ValueError:
                pass
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{key} must be {want.__name__}; got {value!r}.")
