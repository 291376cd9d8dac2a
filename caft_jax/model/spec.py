"""ModelSpec: everything that distinguishes Llama, Qwen2, Mistral and Gemma-2, held as data.

One decoder implementation (``caft_jax.model.transformer``) reads these fields; no family has its own copy of
the model code. ``spec_from_hf_config`` turns a Hugging Face ``config.json`` into a spec and refuses, with a clear
error, any attribute that would change the computation in a way the decoder does not implement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from caft_jax.errors import ConfigError

# HF architecture name -> family. The family only selects defaults below; the decoder branches on spec fields.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3")
# transformers' config-class defaults that differ from the generic fallbacks used below: a config.json that omits
# one of these keys means this value to transformers, so it must mean it to us too.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"num_key_value_heads": 32, "max_window_layers": 28},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "gemma2": {
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    },
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a decoder-only transformer (hashable, so it can live in a jit-static graphdef).

    Attributes:
      family: "llama" | "qwen2" | "mistral" | "gemma2".
      vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: sizes.
      norm_eps: RMSNorm epsilon.
      norm_offset: 1.0 for Gemma's (1 + w) RMSNorm, 0.0 for the Llama-style w * x.
      norm_scale_in_fp32: Gemma multiplies by (offset + w) in fp32 before casting; Llama casts first.
      activation: "silu" or "gelu_tanh" (the gated MLP's nonlinearity).
      qkv_bias: Qwen2's q/k/v projection biases.
      tie_embeddings: the LM head is the transposed embedding table.
      embed_scale: Gemma multiplies embeddings by sqrt(d_model), cast to the activation dtype first.
      sandwich_norms: Gemma-2's post-attention and post-MLP norms on the sublayer outputs.
      query_scale: multiplier of q.k (head_dim ** -0.5, or query_pre_attn_scalar ** -0.5 for Gemma-2).
      attn_softcap, final_softcap: cap * tanh(x / cap) on attention / final logits (0 disables).
      windows: per-layer sliding window in tokens, 0 = global attention; a key at index s is visible from a
        query at index t when t - window < s <= t.
      rope_theta, rope_type, rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_pos:
        rotary embedding (rotate-half convention, as in HF checkpoints); rope_type is "default", "linear" or
        "llama3" (Llama-3.1 frequency correction).
      bos_token_id, eos_token_ids, pad_token_id: special ids from the config (may be None / empty).
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    norm_scale_in_fp32: bool = False
    activation: str = "silu"
    qkv_bias: bool = False
    tie_embeddings: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_scale: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    windows: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.windows:
            object.__setattr__(self, "windows", (0,) * self.n_layers)
        if self.query_scale is None:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if len(self.windows) != self.n_layers:
            raise ConfigError(f"ModelSpec.windows has {len(self.windows)} entries but n_layers is {self.n_layers}.")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}."
            )
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"Unknown activation {self.activation!r}; use 'silu' or 'gelu_tanh'.")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    """First present, non-None value among several HF key spellings (4.x and 5.x configs differ)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _rope_fields(cfg: dict) -> dict:
    """Rotary settings from transformers-4 (rope_theta, rope_scaling) or -5 (rope_parameters) keys, resolved as
    transformers 5 resolves them (``convert_rope_params_to_dict``): a non-empty legacy ``rope_scaling`` replaces
    ``rope_parameters`` whole (it is not merged into it), its type is ``rope_type`` or else ``type``, and the theta
    is that dict's, else the top-level ``rope_theta``, else 10000 (the default of all four families)."""
    merged = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in merged.values()):
        raise ConfigError("config.json has per-layer-type RoPE parameters, which caft_jax does not implement.")
    theta = merged.get("rope_theta")
    if theta is None:
        theta = _get(cfg, "rope_theta", default=10000.0)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r} in config.json is not implemented; caft_jax supports {', '.join(ROPE_TYPES)}."
        )
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(rope_type, [])
    if rope_type == "llama3" and "original_max_position_embeddings" not in merged:  # transformers' fallback
        merged["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
        needed.append("original_max_position_embeddings")
    absent = [k for k in needed if merged.get(k) is None]
    if absent:
        raise ConfigError(
            f"rope type {rope_type!r} in config.json lacks {', '.join(absent)}; add them to rope_parameters."
        )
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        out["rope_original_max_pos"] = int(merged["original_max_position_embeddings"])
    return out


def _layer_windows(cfg: dict, family: str, n_layers: int) -> tuple[int, ...]:
    """Per-layer sliding window (0 = global), read from config.layer_types when present."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is None:
        if family == "gemma2":  # HF's default pattern: sliding first, then alternating.
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif family == "qwen2":  # transformers-4 configs: sliding only from max_window_layers on, if enabled.
            start = cfg.get("max_window_layers", n_layers)
            use = cfg.get("use_sliding_window", False)
            types = ["sliding_attention" if use and i >= start else "full_attention" for i in range(n_layers)]
        elif family == "mistral" and window:
            types = ["sliding_attention"] * n_layers
        else:
            types = ["full_attention"] * n_layers
    if len(types) != n_layers:
        raise ConfigError(f"config.layer_types has {len(types)} entries but num_hidden_layers is {n_layers}.")
    windows = []
    for i, kind in enumerate(types):
        if kind == "full_attention":
            windows.append(0)
        elif kind == "sliding_attention":
            if not window:
                raise ConfigError(f"layer {i} is 'sliding_attention' but config.sliding_window is not set.")
            windows.append(int(window))
        else:
            raise ConfigError(
                f"layer_types[{i}]={kind!r} is not implemented; use 'full_attention' or 'sliding_attention'."
            )
    return tuple(windows)


def _reject_unsupported(cfg: dict, family: str) -> None:
    """Refuse config attributes that would change the computation in ways the decoder does not implement."""
    problems = []
    if cfg.get("quantization_config"):
        problems.append("quantization_config is set (quantised checkpoints are not supported; use a bf16/fp32 one)")
    if cfg.get("attention_bias") and family != "qwen2":
        problems.append("attention_bias=true (q/k/v/o biases are only implemented as Qwen2's q/k/v biases)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true is not implemented")
    if cfg.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true is not implemented")
    act = _get(cfg, "hidden_activation", "hidden_act", default="silu")
    if act not in ACTIVATIONS:
        problems.append(f"activation {act!r} is not implemented (supported: {', '.join(ACTIVATIONS)})")
    if problems:
        raise ConfigError(
            "config.json cannot be run by caft_jax: "
            + "; ".join(problems)
            + ". Use a Llama, Qwen2, Mistral or Gemma-2 checkpoint without these settings."
        )


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict (transformers 4.x or 5.x spelling).

    Raises:
      ConfigError: unknown architecture, or an attribute that changes the computation and is not implemented.
    """
    arch = (cfg.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) if arch else None
    if family is None:
        family = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma2": "gemma2"}.get(
            cfg.get("model_type", "")
        )
    if family is None:
        raise ConfigError(
            f"Unknown architecture {arch or cfg.get('model_type')!r} in config.json; caft_jax supports "
            f"{', '.join(ARCHITECTURES)}."
        )
    cfg = {**FAMILY_DEFAULTS.get(family, {}), **cfg}
    absent = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if absent:
        raise ConfigError(f"config.json lacks {', '.join(absent)}; use the config.json saved with the weights.")
    _reject_unsupported(cfg, family)
    n_layers = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    d_model = int(cfg["hidden_size"])
    head_dim = int(_get(cfg, "head_dim", default=d_model // n_heads))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(_get(cfg, "num_key_value_heads", default=n_heads)),
        head_dim=head_dim,
        d_ff=int(cfg["intermediate_size"]),
        norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        activation=ACTIVATIONS[_get(cfg, "hidden_activation", "hidden_act", default="silu")],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma2")),
        windows=_layer_windows(cfg, family, n_layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        **_rope_fields(cfg),
    )
    if family == "qwen2":
        fields["qkv_bias"] = True
    if family == "gemma2":
        fields.update(
            norm_offset=1.0,
            norm_scale_in_fp32=True,
            embed_scale=True,
            sandwich_norms=True,
            query_scale=float(_get(cfg, "query_pre_attn_scalar", default=head_dim)) ** -0.5,
            attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        )
    return ModelSpec(**fields)


def load_hf_config(model_dir: str | os.PathLike) -> dict:
    """Read ``config.json`` from a local model directory, with a clear error if it is missing or malformed."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isdir(os.fspath(model_dir)):
        raise ConfigError(f"Model directory {os.fspath(model_dir)!r} does not exist; pass a local HF model directory.")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing; the model directory must hold a Hugging Face config.json.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-save the model.") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} holds a JSON {type(cfg).__name__}, not an object; re-download or re-save the model.")
    return cfg


def rope_inverse_frequencies(spec: ModelSpec):
    """Inverse rotary frequencies [head_dim // 2] in float64 numpy, including linear / Llama-3.1 scaling."""
    import numpy as np

    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim))
    if spec.rope_type == "linear":
        inv_freq = inv_freq / spec.rope_factor
    elif spec.rope_type == "llama3":
        # Llama-3.1: long wavelengths are slowed by `factor`, short ones kept, and a smooth blend in between.
        low_wavelen = spec.rope_original_max_pos / spec.rope_low_freq_factor
        high_wavelen = spec.rope_original_max_pos / spec.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / spec.rope_factor, inv_freq)
        smooth = (spec.rope_original_max_pos / wavelen - spec.rope_low_freq_factor) / (
            spec.rope_high_freq_factor - spec.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq
