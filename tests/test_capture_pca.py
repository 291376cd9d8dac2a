"""Activation capture against transformers' hidden states, paired differences, and PCA against SVD / scikit-learn."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_hf_model

from caft_jax import load_model
from caft_jax.data import make_batches
from caft_jax.discovery import (
    PCAResult,
    StreamingPCA,
    capture_activations,
    capture_pairs,
    iter_pairs,
    load_pca,
    pair_pca,
    pca_exact,
    positions_mask,
    save_pca,
)
from caft_jax.discovery.capture import first_token_mask
from caft_jax.errors import CheckpointError, ConfigError, DataError
from caft_jax.lora import LoraConfig, merge_lora
from caft_jax.model.layers import LORA_TARGETS

N_LAYERS = 3  # hf_models.COMMON


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(our Model, transformers model) of the tiny llama."""
    path = tmp_path_factory.mktemp("capture_llama")
    hf = save_hf_model("llama", path)
    return load_model(str(path)), hf


def make_examples(n: int, seed: int = 0, vocab: int = 128):
    """Random (ids, loss_mask) examples of varied length; the answer is a random-length suffix."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 17))
        ids = rng.integers(3, vocab, size=length).tolist()
        start = int(rng.integers(1, length - 1))
        out.append((ids, [j >= start for j in range(length)]))
    return out


def batches_of(examples, batch_size=3):
    return list(make_batches(examples, batch_size, seed=0, epoch=0, pad_id=0, buckets=(16,), shuffle=False))


def random_lora(model, cfg, seed=1):
    """A LoRA tree with non-zero A and B (built in numpy: eager jax.random per leaf is slow on CPU)."""
    rng, lora = np.random.default_rng(seed), {}
    for target in cfg.targets:
        sub, name = LORA_TARGETS[target]
        n_layers, d_in, d_out = model.params["layers"][sub][name].shape
        a = 0.1 * rng.normal(size=(n_layers, d_in, cfg.rank))
        b = 0.1 * rng.normal(size=(n_layers, cfg.rank, d_out))
        lora.setdefault(sub, {})[name] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    return lora


def hf_activations(hf, batch, layers, site):
    """{layer: [b, t, d]} from transformers: hidden_states[l + 1] (resid_post) or the input of the layer's
    post_attention_layernorm (resid_mid)."""
    mask = batch["attn_mask"]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    mids, handles = {}, []
    if site == "resid_mid":
        for layer in layers:
            norm = hf.model.layers[layer].post_attention_layernorm
            handles.append(
                norm.register_forward_pre_hook(lambda m, args, layer=layer: mids.__setitem__(layer, args[0]))
            )
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )
    for h in handles:
        h.remove()
    if site == "resid_mid":
        return {layer: mids[layer].numpy() for layer in layers}
    return {layer: out.hidden_states[layer + 1].numpy() for layer in layers}


@pytest.mark.parametrize(
    "site, mask, exclude_first",
    [("resid_post", "nonpad", False), ("resid_post", "answer", False), ("resid_mid", "nonpad", True)],
)
def test_capture_matches_transformers(llama, site, mask, exclude_first):
    """Captured tokens equal HF's activations at the masked positions (non-final layers: HF's last hidden state is
    after the final norm)."""
    model, hf = llama
    layers = (0, 1)
    batches = batches_of(make_examples(7))  # 3 batches, the last with 2 padding rows
    got = capture_activations(model, batches, layers, site=site, mask=mask, exclude_first=exclude_first, progress=False)
    ref = {layer: [] for layer in layers}
    for batch in batches:
        keep = positions_mask(batch, mask, exclude_first=exclude_first)
        acts = hf_activations(hf, batch, layers, site)
        for layer in layers:
            ref[layer].append(acts[layer][keep])
    for layer in layers:
        want = np.concatenate(ref[layer])
        assert got[layer].dtype == np.float32 and got[layer].shape == want.shape
        np.testing.assert_allclose(got[layer], want, atol=2e-5, rtol=1e-4)
    n_real = sum(int(b["attn_mask"].sum()) for b in batches)
    n_answer = sum(int(b["loss_mask"].sum()) for b in batches)
    expected = {"nonpad": n_real - (7 if exclude_first else 0), "answer": n_answer}[mask]
    assert got[0].shape[0] == expected


def test_position_masks():
    batch = {
        "attn_mask": np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool),
        "loss_mask": np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool),
        "row_valid": np.array([True, True, False]),
    }
    first = first_token_mask(batch["attn_mask"])
    np.testing.assert_array_equal(np.argwhere(first), [[0, 2], [1, 0]])
    np.testing.assert_array_equal(positions_mask(batch, "answer"), batch["loss_mask"])
    np.testing.assert_array_equal(positions_mask(batch, "nonpad"), batch["attn_mask"])
    nonpad_no_sink = positions_mask(batch, "nonpad", exclude_first=True)
    assert nonpad_no_sink.sum() == 6 and not nonpad_no_sink[0, 2] and not nonpad_no_sink[1, 0]
    with pytest.raises(ConfigError, match="token mask"):
        positions_mask(batch, "everything")
    with pytest.raises(DataError, match="loss_mask"):
        positions_mask({"attn_mask": batch["attn_mask"]}, "answer")


def test_capture_pairs_lora_equals_merged_difference(llama):
    """Differences with tuned given as a LoRA tree equal separate captures of the merged model minus the base;
    iter_pairs with tuned given as a Model returns both sides; streaming PCA of the differences equals exact PCA."""
    model, _ = llama
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = random_lora(model, cfg)
    merged = model.replace_params(merge_lora(model.params, lora, cfg.scale))
    batches = batches_of(make_examples(8, seed=3))
    layers = (0, 2)
    base = capture_activations(model, batches, layers, mask="answer", progress=False)
    tuned = capture_activations(merged, batches, layers, mask="answer", progress=False)
    via_lora = capture_pairs(model, lora, batches, layers, lora_settings=cfg.settings(), mask="answer", progress=False)
    pairs = list(iter_pairs(model, merged, batches, layers, mask="answer"))  # tuned given as a Model
    for layer in layers:
        want = tuned[layer] - base[layer]
        assert np.abs(want).max() > 1e-3  # the adapter really changes the activations
        np.testing.assert_allclose(via_lora[layer], want, atol=2e-5)
        np.testing.assert_allclose(np.concatenate([p[layer][0] for p in pairs]), base[layer], atol=1e-6)
        np.testing.assert_allclose(np.concatenate([p[layer][1] for p in pairs]), tuned[layer], atol=1e-6)

    settings = cfg.settings()
    accumulators = {layer: StreamingPCA(model.spec.d_model) for layer in layers}
    kept = capture_pairs(
        model, lora, batches, layers, lora_settings=settings, accumulators=accumulators, progress=False
    )
    assert kept == {}
    streamed = pair_pca(model, lora, batches, layers, n_components=5, lora_settings=settings, progress=False)
    for layer in layers:
        exact = pca_exact(via_lora[layer], 5)
        for result in (accumulators[layer].finalize(5), streamed[layer]):
            assert result.n_tokens == exact.n_tokens == len(via_lora[layer])
            np.testing.assert_allclose(result.components, exact.components, atol=1e-5)
            np.testing.assert_allclose(result.explained_variance, exact.explained_variance, rtol=1e-5)


def test_capture_rejects_bad_arguments(llama):
    model, _ = llama
    batches = batches_of(make_examples(2))
    with pytest.raises(ConfigError, match="capture layers"):
        capture_activations(model, batches, [N_LAYERS], progress=False)
    with pytest.raises(ConfigError, match="capture site"):
        capture_activations(model, batches, [0], site="resid_pre", progress=False)
    with pytest.raises(ConfigError, match="lora_settings"):
        capture_pairs(model, {"attn": {}}, batches, [0], progress=False)
    with pytest.raises(ConfigError, match="accumulators"):
        capture_pairs(model, model, batches, [0, 1], accumulators={0: StreamingPCA(64)}, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------------------------


def planted(n=4000, d=48, seed=0, offset=0.0):
    """Isotropic noise (sd 0.3) plus a strong planted direction u (sd 4) and a weaker one w (sd 2); returns X, u, w."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, 2)))
    u, w = q[:, 0], q[:, 1]
    X = 0.3 * rng.normal(size=(n, d)) + np.outer(4 * rng.normal(size=n), u) + np.outer(2 * rng.normal(size=n), w)
    X[:, 3] += offset  # a "massive" dimension: a large constant on every token
    return X.astype(np.float32), u, w


def test_planted_direction_is_recovered():
    X, u, w = planted()
    result = pca_exact(X, n_components=20)
    assert result.components.shape == (20, 48) and result.explained_variance.shape == (20,)
    assert abs(result.components[0] @ u) > 0.99 and abs(result.components[1] @ w) > 0.99
    assert result.explained_variance[0] == pytest.approx(16, rel=0.1)
    assert result.explained_variance_ratio[0] == pytest.approx(16 / (16 + 4 + 48 * 0.09), rel=0.1)
    np.testing.assert_allclose(result.components @ result.components.T, np.eye(20), atol=1e-5)
    peaks = result.components[np.arange(20), np.abs(result.components).argmax(1)]
    assert (peaks > 0).all()  # sign convention


def test_streaming_equals_exact_and_sklearn():
    from sklearn.decomposition import PCA

    X, _, _ = planted(n=3000, offset=1000.0)
    exact = pca_exact(X, n_components=10)
    stream = StreamingPCA(X.shape[1])
    for start in range(0, len(X), 701):  # uneven chunks
        stream.update(X[start : start + 701])
    streamed = stream.finalize(10)
    assert streamed.n_tokens == exact.n_tokens == 3000
    np.testing.assert_allclose(streamed.components, exact.components, atol=1e-5)
    np.testing.assert_allclose(streamed.explained_variance, exact.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(streamed.explained_variance_ratio, exact.explained_variance_ratio, rtol=1e-5)
    np.testing.assert_allclose(streamed.mean, exact.mean, rtol=1e-7)

    sk = PCA(n_components=10, svd_solver="full").fit(X.astype(np.float64))
    signs = np.sign((sk.components_ * exact.components).sum(1))
    np.testing.assert_allclose(exact.components, sk.components_ * signs[:, None], atol=1e-5)
    np.testing.assert_allclose(exact.explained_variance, sk.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(exact.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(exact.mean, sk.mean_, rtol=1e-9)


def test_pca_input_errors():
    with pytest.raises(DataError, match="at least 2 tokens"):
        pca_exact(np.zeros((1, 4)))
    with pytest.raises(DataError, match=r"\[n_tokens, d\]"):
        pca_exact(np.zeros(4))
    with pytest.raises(DataError, match="NaN"):
        pca_exact(np.full((3, 4), np.nan))
    with pytest.raises(DataError, match="d=4"):
        StreamingPCA(4).update(np.zeros((3, 5)))
    with pytest.raises(DataError, match="at least 2 tokens"):
        StreamingPCA(4).finalize()


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_load_round_trip(tmp_path, suffix):
    X, _, _ = planted(n=500, d=16)
    results = {0: pca_exact(X, 4), 7: pca_exact(X[:300] * 2, 3)}
    meta = dict(
        model="m", adapter="a", layers=[0, 7], data="d.jsonl", token_count=500, mask="answer", site="resid_post"
    )
    path = save_pca(tmp_path / f"pcs{suffix}", results, meta)
    loaded, loaded_meta = load_pca(path)
    for key, value in meta.items():
        assert loaded_meta[key] == value
    assert loaded_meta["n_tokens"] == {"0": 500, "7": 300}
    assert sorted(loaded) == [0, 7]
    for layer, r in results.items():
        got = loaded[layer]
        assert isinstance(got, PCAResult) and got.n_tokens == r.n_tokens
        np.testing.assert_array_equal(got.components, r.components)
        np.testing.assert_array_equal(got.explained_variance, r.explained_variance)
        np.testing.assert_array_equal(got.explained_variance_ratio, r.explained_variance_ratio)
        np.testing.assert_array_equal(got.mean, r.mean)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pca(tmp_path / "missing.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_pca(tmp_path / "junk.npz")
