"""Logits of our forward against transformers (PyTorch CPU, fp32) on tiny models of every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, save_hf_model

from caft_jax import jit_forward, load_model

T = 260  # long enough for RoPE errors to show, and past Gemma's/Mistral's sliding windows


def left_padded_batch(vocab: int, t: int = T, pad: int = 37, seed: int = 0):
    """Two rows: one full, one left-padded by `pad` tokens. Returns tokens, mask, HF position ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(2, t))
    mask = np.ones((2, t), bool)
    mask[1, :pad] = False
    tokens[1, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return (
            model(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions),
            )
            .logits.float()
            .numpy()
        )


def assert_logits_match(model_dir, hf_model, vocab=128, atol=1e-4, t=T):
    tokens, mask, positions = left_padded_batch(vocab, t)
    ref = hf_logits(hf_model, tokens, mask, positions)
    ours = np.asarray(jit_forward(load_model(model_dir), jnp.asarray(tokens), attn_mask=jnp.asarray(mask)).logits)
    # Padding rows are garbage in both implementations; compare real tokens only.
    err = np.abs(ours - ref)[mask].max()
    assert err <= atol, f"max |delta logit| = {err}"
    return ref


@pytest.mark.parametrize("t", [T, 256])  # 256: the block-causal path (caft_jax.model.layers.CAUSAL_BLOCK = 128)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, t, tiny_models):
    model_dir, hf_model = tiny_models[family]
    ref = assert_logits_match(model_dir, hf_model, t=t)
    if family == "gemma2":  # the final soft-cap (3.0) must actually be reached: tanh saturates near the cap
        assert np.abs(ref).max() > 0.75 * 3.0


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", dict(num_key_value_heads=4)),  # MHA
        ("qwen2", dict(tie_word_embeddings=False)),  # untied Qwen2 head
        ("mistral", dict(num_key_value_heads=1, sliding_window=None)),  # MQA, no window
        ("gemma2", dict(num_key_value_heads=4, layer_types=["full_attention", "sliding_attention", "full_attention"])),
    ],
)
def test_logits_match_transformers_variants(family, overrides, tmp_path):
    hf_model = save_hf_model(family, tmp_path, seed=1, **overrides)
    assert_logits_match(str(tmp_path), hf_model)


def test_gemma2_attention_softcap_is_reached(tiny_models):
    """Removing the attention soft-cap changes the output, so the parity above really covers it."""
    import dataclasses

    model = load_model(tiny_models["gemma2"][0])
    tokens = jnp.asarray(left_padded_batch(128)[0])
    capped = jit_forward(model, tokens).logits
    spec = dataclasses.replace(model.spec, attn_softcap=0.0)
    from caft_jax.model.transformer import init_model

    uncapped_model = init_model(spec).replace(params=model.params)
    uncapped = jit_forward(uncapped_model, tokens).logits
    assert float(jnp.abs(capped - uncapped).max()) > 1e-2


def test_bfloat16_close_to_transformers_bfloat16(tiny_models):
    """bf16 params and compute (fp32 softmax and norms) stay close to transformers run in bf16."""
    for family in ("llama", "gemma2"):
        model_dir, hf_model = tiny_models[family]
        tokens, mask, positions = left_padded_batch(128, t=64)
        ref32 = hf_logits(hf_model, tokens, mask, positions)
        hf16 = type(hf_model)(hf_model.config).to(torch.bfloat16).eval()
        hf16.load_state_dict(hf_model.state_dict())
        ref16 = hf_logits(hf16, tokens, mask, positions).astype(np.float32)
        ours = jit_forward(load_model(model_dir, dtype="bfloat16"), jnp.asarray(tokens), attn_mask=jnp.asarray(mask))
        ours = np.asarray(ours.logits)
        assert ours.dtype == np.float32
        ours_err, hf_err = np.abs(ours - ref32)[mask].max(), np.abs(ref16 - ref32)[mask].max()
        # Both bf16 implementations sit at a similar distance from fp32, and close to each other.
        assert ours_err < 3 * hf_err + 1e-2, (family, ours_err, hf_err)
        assert np.abs(ours - ref16)[mask].max() < 0.25


def test_scan_keeps_program_size_constant_in_depth():
    """Layers run under lax.scan: the traced program does not grow with the number of layers."""
    from caft_jax import ModelSpec, forward, init_model

    sizes = []
    for n_layers in (2, 8):
        spec = ModelSpec(
            "llama", vocab_size=32, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24
        )
        model = init_model(spec)
        jaxpr = jax.make_jaxpr(lambda p, m=model: forward(m.replace(params=p), jnp.zeros((1, 4), jnp.int32)).logits)
        sizes.append(len(jaxpr(model.params).eqns))
    assert sizes[0] == sizes[1]


def test_remat_gives_same_gradients(tiny_models):
    from caft_jax import forward

    model = load_model(tiny_models["llama"][0])
    tokens = jnp.asarray(left_padded_batch(128, t=32)[0])

    def loss(params, remat):
        out = forward(model.replace(params=params), tokens, remat=remat).logits
        return jnp.mean(jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, tokens[..., None], -1)[..., 0])

    grads = {r: jax.jit(jax.grad(loss), static_argnums=1)(model.params, r) for r in ("none", "full", "dots")}
    for r in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads["none"], grads[r])
