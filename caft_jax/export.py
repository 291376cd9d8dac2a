"""Export trained weights for the PyTorch ecosystem: PEFT LoRA adapters and merged Hugging Face checkpoints.

``export_peft_adapter`` / ``load_peft_adapter`` convert our LoRA tree ({"attn"|"mlp": {kernel: {"a": [L, in, r],
"b": [L, r, out]}}}) to and from a PEFT adapter directory; ``export_merged`` folds LoRA into the base weights (or
takes fully fine-tuned params) and writes a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
Tensor names and the [out, in] layout come from ``caft_jax.io.hf.hf_param_map``, the map the loader uses.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from caft_jax.errors import CheckpointError, ConfigError
from caft_jax.io.hf import get_path, hf_param_map
from caft_jax.lora import LoraConfig, merge_lora
from caft_jax.model.layers import LORA_TARGETS
from caft_jax.model.spec import ARCHITECTURES, ModelSpec
from caft_jax.model.transformer import Model

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_HF_SUB = {"attn": "self_attn", "mlp": "mlp"}
# PEFT saves without the adapter name; some tools keep ".default" — accept both.
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)
_SAVABLE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


def _to_host(x) -> np.ndarray:
    """A (possibly sharded) jax array as a host numpy array; dtypes safetensors cannot store go through float32.

    Single-host arrays are read with ``np.asarray``. On several hosts every process must call this in the same
    order (it is a collective): ``process_allgather`` assembles the global value on each host.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    arr = np.asarray(x)
    return arr if arr.dtype in _SAVABLE else arr.astype(np.float32)


def _lora_dims(spec: ModelSpec, name: str) -> tuple[int, int]:
    """(in, out) of a LoRA target kernel, from the spec (so an adapter is checked without loading weights)."""
    d_in = {"o_proj": spec.q_dim, "down_proj": spec.d_ff}.get(name, spec.d_model)
    d_out = {"q_proj": spec.q_dim, "k_proj": spec.kv_dim, "v_proj": spec.kv_dim}.get(name, spec.d_model)
    return d_in, spec.d_ff if name in ("gate_proj", "up_proj") else d_out


def _check_lora(lora: dict, cfg: LoraConfig, spec: ModelSpec) -> None:
    want = {LORA_TARGETS[t] for t in cfg.targets}
    have = {(sub, name) for sub, kernels in lora.items() for name in kernels}
    if have != want:
        raise ConfigError(
            f"LoRA tree holds {sorted(have)} but the LoraConfig targets {sorted(want)}; pass matching ones."
        )
    for sub, name in have:
        d_in, d_out = _lora_dims(spec, name)
        a, b = lora[sub][name]["a"].shape, lora[sub][name]["b"].shape
        if a != (spec.n_layers, d_in, cfg.rank) or b != (spec.n_layers, cfg.rank, d_out):
            raise ConfigError(
                f"LoRA {sub}.{name} has shapes a{a} b{b}, expected a{(spec.n_layers, d_in, cfg.rank)} "
                f"b{(spec.n_layers, cfg.rank, d_out)} for this model and rank."
            )


def export_peft_adapter(
    lora: dict, lora_cfg: LoraConfig, spec: ModelSpec, out_dir, *, base_model_name_or_path: str = ""
) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` for ``peft.PeftModel.from_pretrained``.

    PEFT stores lora_A as [r, in] and lora_B as [out, r] (torch Linear layout), so ours are transposed per layer.
    Tensors keep their dtype (bf16 included); the scale (alpha / sqrt(r) or alpha / r) is implied by the config.
    """
    _check_lora(lora, lora_cfg, spec)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for sub, kernels in lora.items():
        for name, ab in kernels.items():
            a, b = _to_host(ab["a"]), _to_host(ab["b"])
            for i in range(spec.n_layers):
                prefix = f"base_model.model.model.layers.{i}.{_HF_SUB[sub]}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    if jax.process_index() != 0:  # every process gathered (collective); one writes
        return out
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": lora_cfg.rank,
        "lora_alpha": int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha,  # PEFT types int
        "use_rslora": lora_cfg.rslora,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": [LORA_TARGETS[t][1] for t in lora_cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_peft_adapter(adapter_dir, model: Model) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter directory into (our LoRA tree, LoraConfig), checking every shape against ``model``.

    Only plain LoRA on q/k/v/o/gate/up/down of every layer is representable (no DoRA, bias, per-module ranks).
    """
    root = pathlib.Path(adapter_dir)
    cfg_path, weights_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; pass a directory written by PEFT save_pretrained.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-export the adapter.") from e
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{cfg_path} describes a {cfg.get('peft_type')!r} adapter; only LORA adapters can be loaded.")
    # PEFT features our LoRA tree cannot hold: refuse rather than silently drop them.
    features = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices")
    unsupported = [k for k in features if cfg.get(k)] + [k for k in ("layers_to_transform",) if cfg.get(k) is not None]
    unsupported += ["bias"] if cfg.get("bias", "none") != "none" else []
    if unsupported:
        raise ConfigError(f"{cfg_path} uses {', '.join(unsupported)}, which caft_jax's LoRA cannot represent.")
    spec, rank = model.spec, int(cfg.get("r", 8))
    found: dict[tuple[str, str], dict[str, dict[int, np.ndarray]]] = {}
    for key, arr in load_file(weights_path).items():
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"{weights_path}: tensor {key} is not a LoRA weight of a q/k/v/o/gate/up/down proj.")
        hf_sub, name = m.group(2).split(".")
        sub = "attn" if hf_sub == "self_attn" else "mlp"
        found.setdefault((sub, name), {"A": {}, "B": {}})[m.group(3)][int(m.group(1))] = arr
    if isinstance(cfg.get("target_modules"), list) and set(cfg["target_modules"]) != {n for _, n in found}:
        raise CheckpointError(
            f"{root}: target_modules {cfg['target_modules']} do not match the stored tensors "
            f"{sorted(n for _, n in found)}; re-export the adapter."
        )
    lora: dict = {}
    for (sub, name), ab in sorted(found.items()):
        d_in, d_out = _lora_dims(spec, name)
        mats = {}
        for kind, want in (("A", (rank, d_in)), ("B", (d_out, rank))):
            if sorted(ab[kind]) != list(range(spec.n_layers)):
                raise CheckpointError(f"{root}: {name}.lora_{kind} is not stored for all {spec.n_layers} layers.")
            bad = [i for i, x in ab[kind].items() if x.shape != want]
            if bad:
                raise CheckpointError(
                    f"{root}: layer {bad[0]} {name}.lora_{kind} has shape {ab[kind][bad[0]].shape}, expected {want}; "
                    "the adapter was trained for a different model or rank."
                )
            mats[kind] = np.stack([ab[kind][i].T for i in range(spec.n_layers)])
        lora.setdefault(sub, {})[name] = {"a": jnp.asarray(mats["A"]), "b": jnp.asarray(mats["B"])}
    if not lora:
        raise CheckpointError(f"{weights_path} holds no LoRA tensors; re-export the adapter.")
    targets = tuple(t for t, key in LORA_TARGETS.items() if key[1] in lora.get(key[0], {}))
    lora_cfg = LoraConfig(
        rank=rank,
        alpha=float(cfg.get("lora_alpha", 8)),
        rslora=bool(cfg.get("use_rslora", False)),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=targets,
    )
    return lora, lora_cfg


def hf_config_from_spec(spec: ModelSpec, dtype: str = "float32") -> dict:
    """A transformers config.json dict for ``spec`` (4.x and 5.x rope spellings; sizes, norms, windows, caps).

    Prefer the base model's own config.json (``export_merged(source_config=...)``): the spec does not hold
    fields that do not change the forward, such as max_position_embeddings (estimated here).
    """
    arch = {family: arch for arch, family in ARCHITECTURES.items()}[spec.family]
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[spec.activation]
    rope = {"rope_type": spec.rope_type, "rope_theta": spec.rope_theta}
    if spec.rope_type in ("linear", "llama3"):
        rope["factor"] = spec.rope_factor
    if spec.rope_type == "llama3":
        rope.update(
            low_freq_factor=spec.rope_low_freq_factor,
            high_freq_factor=spec.rope_high_freq_factor,
            original_max_position_embeddings=spec.rope_original_max_pos,
        )
    cfg = {
        "architectures": [arch],
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.d_ff,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.norm_eps,
        "hidden_activation" if spec.family == "gemma2" else "hidden_act": act,
        "tie_word_embeddings": spec.tie_embeddings,
        "max_position_embeddings": int(spec.rope_original_max_pos * max(spec.rope_factor, 1.0)),
        "rope_parameters": rope,
        "rope_theta": spec.rope_theta,  # transformers 4.x reads these two; 5.x reads rope_parameters
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if spec.rope_type != "default" else None,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids)
        if len(spec.eos_token_ids) > 1
        else next(iter(spec.eos_token_ids), None),
        "pad_token_id": spec.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    windows = sorted({w for w in spec.windows if w})
    layer_types = ["sliding_attention" if w else "full_attention" for w in spec.windows]
    if len(windows) > 1:
        raise ConfigError(f"Layers use several sliding windows {windows}; HF configs hold one sliding_window.")
    window = windows[0] if windows else None
    if spec.family == "llama" and window:
        raise ConfigError("A llama spec with sliding-window layers has no transformers config; use mistral.")
    if spec.family == "mistral":  # Mistral's config has one window for all layers, no layer_types
        if window and 0 in spec.windows:
            raise ConfigError("Mistral configs cannot mix sliding and global layers; use one window for all layers.")
        cfg["sliding_window"] = window
    elif spec.family in ("qwen2", "gemma2"):
        cfg.update(sliding_window=window, layer_types=layer_types)
        if spec.family == "qwen2":
            cfg.update(
                use_sliding_window=bool(window),
                max_window_layers=layer_types.index("sliding_attention") if window else spec.n_layers,
            )
    if spec.family == "gemma2":
        cfg.update(
            query_pre_attn_scalar=round(spec.query_scale**-2),  # transformers types it int
            attn_logit_softcapping=spec.attn_softcap or None,
            final_logit_softcapping=spec.final_softcap or None,
        )
    return cfg


def export_merged(
    model: Model,
    lora: dict | None,
    lora_cfg: LoraConfig | None,
    out_dir,
    *,
    tokenizer=None,
    source_config: dict | None = None,
    dtype=None,
    max_shard_bytes: int = 5 * 1024**3,
) -> pathlib.Path:
    """Write a Hugging Face model directory: safetensors weights, config.json and (optionally) the tokenizer.

    Args:
      model: the base model (or the fully fine-tuned one, with ``lora=None``).
      lora, lora_cfg: LoRA tree folded in as W + scale * A @ B (in float32, then cast), or None.
      out_dir: created if needed.
      tokenizer: saved with ``tokenizer.save_pretrained(out_dir)`` when given.
      source_config: the base model's config.json dict, kept except for the dtype fields; default: built from
        the spec (``hf_config_from_spec``).
      dtype: storage dtype of the written tensors (default: each parameter's own dtype).
      max_shard_bytes: above this total, weights go to several files plus model.safetensors.index.json.

    Parameters are read one layer slice at a time, so host memory holds at most one shard. On several hosts
    every process must call this (gathering is collective, see ``_to_host``); only process 0 writes files.
    """
    if lora is not None:
        if lora_cfg is None:
            raise ConfigError("export_merged got a LoRA tree without its LoraConfig; pass lora_cfg.")
        _check_lora(lora, lora_cfg, model.spec)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec, out_dtype = model.spec, None if dtype is None else jnp.dtype(dtype)
    # Plan first (names and sizes from shapes alone) so shards can be named "-0000k-of-0000n" before writing.
    # The plan is parameter-major, so each stacked leaf is merged once and then sliced layer by layer.
    plan = []  # (hf name, our path, layer index or None, transpose, size in bytes)
    for path, (template, transpose) in hf_param_map(spec).items():
        leaf = get_path(model.params, path)
        stacked = path[0] == "layers"
        size = math.prod(leaf.shape[1:] if stacked else leaf.shape) * (out_dtype or jnp.dtype(leaf.dtype)).itemsize
        plan += [
            (template.format(i=i), path, i, transpose, size) for i in (range(spec.n_layers) if stacked else [None])
        ]
    shards: list[list] = [[]]
    for entry in plan:
        if shards[-1] and sum(e[4] for e in shards[-1]) + entry[4] > max_shard_bytes:
            shards.append([])
        shards[-1].append(entry)
    cache: dict = {}

    def value(path: tuple[str, ...]) -> jax.Array:
        """The (LoRA-merged) parameter; only one is cached, so merging never holds a second copy of the model."""
        if path not in cache:
            cache.clear()
            w = get_path(model.params, path)
            ab = (lora or {}).get(path[1], {}).get(path[2]) if len(path) == 3 else None  # a LoRA-targeted kernel
            if ab is not None:
                merged = merge_lora({"layers": {path[1]: {path[2]: w}}}, {path[1]: {path[2]: ab}}, lora_cfg.scale)
                w = merged["layers"][path[1]][path[2]]
            cache[path] = w
        return cache[path]

    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    for fname, entries in zip(names, shards, strict=True):
        tensors = {}
        for hf_name, path, i, transpose, _ in entries:
            x = value(path) if i is None else value(path)[i]
            x = _to_host(x if out_dtype is None else x.astype(out_dtype))
            tensors[hf_name] = np.ascontiguousarray(x.T if transpose else x)
            weight_map[hf_name] = fname
        if jax.process_index() == 0:
            save_file(tensors, out / fname, metadata={"format": "pt"})
    if jax.process_index() != 0:
        return out
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e[4] for e in plan)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = str(out_dtype or jnp.dtype(model.params["layers"]["attn"]["q_proj"].dtype))
    config = dict(source_config) if source_config is not None else hf_config_from_spec(spec, dtype_name)
    config.update(dtype=dtype_name, torch_dtype=dtype_name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(out))
    return out
