"""spec_from_hf_config against transformers' own reading of the same config.json (config classes, RoPE init)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from caft_jax import ConfigError, spec_from_hf_config
from caft_jax.model.spec import rope_inverse_frequencies

CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma2": Gemma2Config}
ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


def minimal(family: str, **extra) -> dict:
    """The fewest config.json keys transformers needs (everything else takes the config class default)."""
    cfg = dict(
        architectures=[ARCHS[family]],
        model_type=family,
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,  # special ids are explicit: their class defaults differ but change no computation
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(extra)
    return cfg


def hf_config(family: str, cfg: dict):
    """transformers' config object for the config.json dict `cfg`."""
    return CONFIG_CLASSES[family](**{k: v for k, v in cfg.items() if k != "model_type"})


def hf_dict(family: str, cfg: dict) -> dict:
    """config.json as transformers 5 would re-save it after loading `cfg` (class defaults filled in)."""
    return hf_config(family, cfg).to_dict()


def windows_from_layer_types(hf_cfg) -> tuple[int, ...]:
    """Per-layer window as transformers' attention modules use it (0 = full attention)."""
    return tuple(hf_cfg.sliding_window if t == "sliding_attention" else 0 for t in hf_cfg.layer_types)


_LLAMA31_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
# the same rope settings in the transformers-4 and the transformers-5 spelling
LLAMA31_V4 = dict(rope_theta=500000.0, rope_scaling=_LLAMA31_SCALING, max_position_embeddings=131072)
LLAMA31_V5 = dict(rope_parameters=dict(rope_theta=500000.0, **_LLAMA31_SCALING), max_position_embeddings=131072)


@pytest.mark.parametrize(
    "v4, v5",
    [
        (LLAMA31_V4, LLAMA31_V5),
        # transformers 4.x spelled the type key "type" in older configs
        (
            dict(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0}),
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}),
        ),
        (dict(rope_theta=1e6), dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        (dict(rope_theta=1e6, rope_scaling=None), dict(rope_parameters={"rope_theta": 1e6})),
        # both keys: transformers lets the legacy rope_scaling replace rope_parameters whole (theta included)
        (
            dict(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}),
            dict(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                rope_scaling={"type": "linear", "factor": 2.0},
            ),
        ),
    ],
)
def test_transformers4_and_5_rope_spellings_give_same_spec(v4, v5):
    spec4 = spec_from_hf_config(minimal("llama", **v4))
    spec5 = spec_from_hf_config(minimal("llama", **v5))
    assert spec4 == spec5
    # transformers itself reads both spellings as the same rope_parameters ...
    # (it keeps a legacy "type" key beside "rope_type")
    p4 = {k: v for k, v in hf_config("llama", minimal("llama", **v4)).rope_parameters.items() if k != "type"}
    p5 = {k: v for k, v in hf_config("llama", minimal("llama", **v5)).rope_parameters.items() if k != "type"}
    assert p4 == p5
    # ... and the spec of transformers' re-saved (v5) config is the same too.
    assert spec_from_hf_config(hf_dict("llama", minimal("llama", **v4))) == spec4
    assert spec4.rope_theta == p4["rope_theta"]
    assert spec4.rope_type == p4.get("rope_type", "default")
    if "factor" in p4:
        assert spec4.rope_factor == p4["factor"]


def test_llama31_inverse_frequencies_match_transformers():
    cfg = minimal("llama", head_dim=128, hidden_size=512, **LLAMA31_V4)
    spec = spec_from_hf_config(cfg)
    assert (spec.rope_type, spec.rope_factor, spec.rope_original_max_pos) == ("llama3", 8.0, 8192)
    hf_cfg = hf_config("llama", cfg)
    ref, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, device=None)
    assert attention_scaling == 1.0
    ref = ref.double().numpy()
    ours = rope_inverse_frequencies(spec)
    assert ours.shape == ref.shape == (64,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    # all three Llama-3.1 regimes are present: unscaled, smoothed and divided by `factor`
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    ratio = ours / base
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio < 0.99) & (ratio > 0.13)).any()


def test_llama3_original_max_position_defaults_to_max_position_embeddings():
    """transformers falls back to max_position_embeddings when rope scaling omits the original context length."""
    scaling = {k: v for k, v in LLAMA31_V4["rope_scaling"].items() if k != "original_max_position_embeddings"}
    cfg = minimal("llama", rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=4096)
    spec = spec_from_hf_config(cfg)
    assert spec.rope_original_max_pos == 4096
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config("llama", cfg), device=None)
    np.testing.assert_allclose(rope_inverse_frequencies(spec), ref.double().numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        dict(rope_parameters=LLAMA31_V5["rope_parameters"], max_position_embeddings=131072),
    ],
)
def test_inverse_frequencies_match_transformers_rotary_module(rope):
    """Every supported rope type gives the same frequencies as transformers' LlamaRotaryEmbedding buffer."""
    cfg = minimal("llama", **rope)
    hf_cfg = hf_config("llama", cfg)
    ref = LlamaRotaryEmbedding(hf_cfg).inv_freq.double().numpy()
    if hf_cfg.rope_parameters["rope_type"] == "linear":
        init_ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf_cfg, device=None)
        np.testing.assert_allclose(init_ref.double().numpy(), ref, rtol=1e-7)
    np.testing.assert_allclose(rope_inverse_frequencies(spec_from_hf_config(cfg)), ref, rtol=1e-6, atol=0)


def test_gemma2_windows_from_layer_types():
    types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = minimal("gemma2", head_dim=16, sliding_window=8, layer_types=types)
    spec = spec_from_hf_config(cfg)
    assert spec.windows == (0, 0, 8, 0)
    assert spec.windows == windows_from_layer_types(hf_config("gemma2", cfg))


def test_gemma2_default_window_pattern():
    """No layer_types: sliding on even layers, global on odd ones, as transformers' Gemma2Config fills in."""
    cfg = minimal("gemma2", head_dim=16, sliding_window=8, num_hidden_layers=5)
    spec = spec_from_hf_config(cfg)
    assert spec.windows == (8, 0, 8, 0, 8)
    assert spec.windows == windows_from_layer_types(hf_config("gemma2", cfg))
    assert spec_from_hf_config(hf_dict("gemma2", cfg)) == spec


@pytest.mark.parametrize("use_sliding_window", [True, False])
def test_qwen2_old_style_sliding_window(use_sliding_window):
    """transformers-4 Qwen2 configs: sliding only from max_window_layers on, and only if use_sliding_window."""
    cfg = minimal(
        "qwen2", num_hidden_layers=5, use_sliding_window=use_sliding_window, max_window_layers=3, sliding_window=16
    )
    spec = spec_from_hf_config(cfg)
    assert spec.windows == ((0, 0, 0, 16, 16) if use_sliding_window else (0,) * 5)
    hf_cfg = hf_config("qwen2", cfg)
    expected = windows_from_layer_types(hf_cfg) if hf_cfg.sliding_window else (0,) * 5
    assert spec.windows == expected
    # the transformers-5 re-save (explicit layer_types) reads the same
    assert spec_from_hf_config(hf_dict("qwen2", cfg)) == spec
    assert spec.qkv_bias


@pytest.mark.parametrize("window", [24, None])
def test_mistral_sliding_window_on_every_layer(window):
    cfg = minimal("mistral", sliding_window=window)
    spec = spec_from_hf_config(cfg)
    assert spec.windows == ((window or 0),) * 4
    # transformers' Mistral attention passes config.sliding_window to every layer
    assert hf_config("mistral", cfg).sliding_window == window


@pytest.mark.parametrize("family", list(CONFIG_CLASSES))
def test_head_dim_default_matches_transformers_attention(family):
    """No head_dim in config.json: the spec uses the head size transformers' attention module is built with."""
    from transformers import AutoModelForCausalLM

    cfg = minimal(family, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    assert "head_dim" not in cfg
    spec = spec_from_hf_config(cfg)
    hf_cfg = hf_config(family, cfg)
    attn = AutoModelForCausalLM.from_config(hf_cfg).model.layers[0].self_attn
    assert spec.head_dim == attn.head_dim
    assert tuple(attn.q_proj.weight.shape) == (spec.q_dim, spec.d_model)
    assert tuple(attn.k_proj.weight.shape) == (spec.kv_dim, spec.d_model)
    if family != "gemma2":
        assert spec.head_dim == 96 // 6
    # an explicit head_dim wins
    assert spec_from_hf_config(minimal(family, head_dim=32)).head_dim == 32


@pytest.mark.parametrize("family", list(CONFIG_CLASSES))
def test_absent_keys_take_transformers_class_defaults(family):
    """A hand-written config.json that omits optional keys means what transformers' config class says it means."""
    cfg = minimal(family)
    assert spec_from_hf_config(cfg) == spec_from_hf_config(hf_dict(family, cfg))


def test_gemma2_spec_fields():
    cfg = minimal(
        "gemma2",
        head_dim=16,
        sliding_window=8,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
    )
    spec = spec_from_hf_config(cfg)
    assert spec.query_scale == pytest.approx(12**-0.5)
    assert (spec.attn_softcap, spec.final_softcap) == (2.0, 0.0)
    assert spec.tie_embeddings and spec.embed_scale and spec.sandwich_norms and spec.norm_offset == 1.0
    assert spec.activation == "gelu_tanh"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="relu"), "relu"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]), "chunked"),
        (dict(layer_types=["full_attention"] * 3), "layer_types"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    ],
)
def test_unimplemented_attributes_are_refused(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        spec_from_hf_config(minimal("llama", **extra))


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_required_key_is_named(key):
    cfg = minimal("llama")
    del cfg[key]
    with pytest.raises(ConfigError, match=f"lacks {key}"):
        spec_from_hf_config(cfg)


def test_spec_is_hashable_and_static():
    spec = spec_from_hf_config(minimal("llama", **LLAMA31_V5))
    assert hash(spec) == hash(spec_from_hf_config(minimal("llama", **LLAMA31_V4)))
    assert spec.q_dim == 64 and spec.kv_dim == 32
