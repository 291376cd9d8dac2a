"""SAEs: both file formats written here, encode/decode against numpy references of caft_method.md 2.3/2.4,
attribution against torch autograd and finite differences on the transformers model, rankings."""

from __future__ import annotations

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_hf_model, tiny_tokenizer

from caft_jax import load_model
from caft_jax.data import letter_token_id, make_batches
from caft_jax.discovery import (
    iter_pairs,
    letter_batches,
    load_batchtopk_sae,
    load_jumprelu_sae,
    load_sae,
    mean_latent_diff,
    rank_latents,
    sae_attribution,
    sae_on_diff,
)
from caft_jax.discovery.capture import first_token_mask
from caft_jax.discovery.latent_scores import latent_sums
from caft_jax.discovery.sae import read_torch_state_dict
from caft_jax.errors import CheckpointError, ConfigError, DataError

D, D_SAE = 64, 96  # hf_models.COMMON hidden size; latent count


# ---------------------------------------------------------------------------------------------------------------
# Writing SAEs in the two formats, and numpy references
# ---------------------------------------------------------------------------------------------------------------


class BatchTopKModule(torch.nn.Module):
    """The parameter layout of dictionary_learning's BatchTopKSAE (so state_dict() has its exact keys)."""

    def __init__(self, d, d_sae, k):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.encoder = torch.nn.Linear(d, d_sae)
        self.decoder = torch.nn.Linear(d_sae, d, bias=False)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))


def random_weights(seed, d=D, d_sae=D_SAE, scale=1.0):
    """W_enc [d, d_sae], b_enc, W_dec [d_sae, d] (unit-norm rows), b_dec, with encoder outputs of order `scale`."""
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(d_sae, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = W_dec.T * scale + 0.1 * rng.normal(size=(d, d_sae))
    return (
        W_enc.astype(np.float32),
        (0.1 * rng.normal(size=d_sae)).astype(np.float32),
        W_dec.astype(np.float32),
        (0.5 * rng.normal(size=d)).astype(np.float32),
    )


def write_batchtopk(directory, weights, threshold, k=8):
    """ae.pt via torch.save(module.state_dict()) and config.json, as dictionary_learning writes them."""
    W_enc, b_enc, W_dec, b_dec = weights
    d, d_sae = W_enc.shape
    module = BatchTopKModule(d, d_sae, k)
    with torch.no_grad():
        module.encoder.weight.copy_(torch.tensor(W_enc.T))
        module.encoder.bias.copy_(torch.tensor(b_enc))
        module.decoder.weight.copy_(torch.tensor(W_dec.T))
        module.b_dec.copy_(torch.tensor(b_dec))
        module.threshold.fill_(threshold)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), directory / "ae.pt")
    trainer = {"dict_class": "BatchTopKSAE", "activation_dim": d, "dict_size": d_sae, "k": k, "layer": 1}
    (directory / "config.json").write_text(json.dumps({"trainer": trainer}))
    return directory


def write_jumprelu(path, weights, threshold):
    W_enc, b_enc, W_dec, b_dec = weights
    np.savez(path, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold.astype(np.float32))
    return path


def ref_encode(kind, weights, threshold, x):
    """caft_method.md 2.3 (BatchTopK with threshold, b_dec subtracted) and 2.4 (JumpReLU), in float64 numpy."""
    W_enc, b_enc, _, b_dec = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    if kind == "batchtopk":
        a = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
        return a * (a > threshold)
    pre = x @ W_enc + b_enc
    return np.maximum(pre, 0) * (pre > threshold)


def ref_decode(weights, f):
    _, _, W_dec, b_dec = (np.asarray(w, np.float64) for w in weights)
    return f @ W_dec + b_dec


# ---------------------------------------------------------------------------------------------------------------
# Loading and encoding
# ---------------------------------------------------------------------------------------------------------------


def test_batchtopk_encode_decode_match_reference(tmp_path):
    weights = random_weights(0)
    x = np.random.default_rng(1).normal(size=(200, D)).astype(np.float32)
    a = np.maximum((x - weights[3]) @ weights[0] + weights[1], 0)
    threshold = float(np.quantile(a[a > 0], 0.5))  # half the positive values are gated off
    sae = load_batchtopk_sae(write_batchtopk(tmp_path / "trainer_1", weights, threshold, k=8))
    assert sae.kind == "batchtopk" and sae.k == 8 and (sae.d_model, sae.d_sae) == (D, D_SAE)
    f = np.asarray(sae.encode(x))
    want = ref_encode("batchtopk", weights, threshold, x)
    np.testing.assert_allclose(f, want, atol=1e-5)
    assert 0 < (f > 0).sum() < ((a > 0).sum())  # the threshold really gates
    np.testing.assert_allclose(np.asarray(sae.decode(f)), ref_decode(weights, want), atol=1e-4)
    # b_dec subtraction matters here: the JumpReLU convention on the same weights differs.
    assert np.abs(ref_encode("jumprelu", weights, threshold, x) - want).max() > 0.1
    assert load_sae(tmp_path / "trainer_1").kind == "batchtopk"


def test_jumprelu_encode_decode_match_reference(tmp_path):
    weights = random_weights(2)
    x = np.random.default_rng(3).normal(size=(200, D)).astype(np.float32)
    pre = x @ weights[0] + weights[1]
    threshold = np.random.default_rng(4).uniform(0.0, 2.0, size=D_SAE)  # per latent
    threshold[:5] = -0.5  # a negative threshold: pre in (-0.5, 0] passes the gate but ReLU zeroes it
    sae = load_jumprelu_sae(write_jumprelu(tmp_path / "params.npz", weights, threshold))
    assert sae.kind == "jumprelu" and sae.threshold.shape == (D_SAE,)
    f = np.asarray(sae.encode(x))
    want = ref_encode("jumprelu", weights, threshold, x)
    np.testing.assert_allclose(f, want, atol=1e-5)
    assert 0 < (f > 0).sum() < (pre > 0).sum()
    np.testing.assert_allclose(np.asarray(sae(x)), ref_decode(weights, want), atol=1e-4)
    assert load_sae(tmp_path).kind == "jumprelu" and load_sae(tmp_path / "params.npz").kind == "jumprelu"


def test_torch_free_reader_equals_torch_load(tmp_path):
    """The restricted unpickler reproduces torch.load for the dtypes and layouts a state dict can hold."""
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        transposed=torch.randn(4, 3, generator=g).t(),  # non-contiguous view
        sliced=torch.randn(10, generator=g)[2:7],  # storage offset
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(),
        f64=torch.randn(2, 2, generator=g).double(),
        i64=torch.arange(4),
        i32=torch.tensor(7, dtype=torch.int),
        scalar=torch.tensor(0.25),
        flag=torch.tensor([True, False]),
    )
    torch.save(state, tmp_path / "ae.pt")
    ours = read_torch_state_dict(tmp_path / "ae.pt")
    ref = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        want = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = ours[key].astype(np.float32) if key == "bf16" else ours[key]
        assert got.shape == tuple(tensor.shape) and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want)


def test_sae_file_errors(tmp_path):
    weights = random_weights(0)
    with pytest.raises(CheckpointError, match="no learned threshold"):
        load_batchtopk_sae(write_batchtopk(tmp_path / "unset", weights, -1.0))
    bad_cfg = write_batchtopk(tmp_path / "badcfg", weights, 0.5)
    (bad_cfg / "config.json").write_text(json.dumps({"trainer": {"activation_dim": 32}}))
    with pytest.raises(CheckpointError, match="activation_dim=32"):
        load_batchtopk_sae(bad_cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_batchtopk_sae(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ae.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ae.pt"):
        load_batchtopk_sae(tmp_path / "junk")
    np.savez(tmp_path / "partial.npz", W_enc=weights[0])
    with pytest.raises(CheckpointError, match="lacks b_enc"):
        load_jumprelu_sae(tmp_path / "partial.npz")
    W_enc, b_enc, W_dec, b_dec = weights
    np.savez(tmp_path / "shape.npz", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec.T, b_dec=b_dec, threshold=b_enc)
    with pytest.raises(CheckpointError, match="W_dec has shape"):
        load_jumprelu_sae(tmp_path / "shape.npz")
    with pytest.raises(CheckpointError, match="neither ae.pt"):
        load_sae(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Attribution
# ---------------------------------------------------------------------------------------------------------------

LAYERS = (0, 2)  # 2 is the last layer: its resid_post is before the final norm in both implementations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny llama (ours + transformers in float64), batches carrying targets, and one SAE of each kind whose
    thresholds are calibrated on the model's activations so that about a third of positive latents fire."""
    root = tmp_path_factory.mktemp("sae_llama")
    hf = save_hf_model("llama", root / "model")
    model = load_model(str(root / "model"))
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(6):
        n = int(rng.integers(6, 16))
        start = int(rng.integers(2, n - 1))
        examples.append((rng.integers(3, 128, size=n).tolist(), [j >= start for j in range(n)]))
    batches = list(make_batches(examples, 4, seed=0, epoch=0, pad_id=0, buckets=(16,), shuffle=False))
    for batch in batches:
        batch["target"] = rng.integers(3, 128, size=4).astype(np.int32)
        batch["other"] = rng.integers(3, 128, size=4).astype(np.int32)
    acts = hf_forward(hf.double(), batches[0], {})[1]
    saes, refs = {}, {}
    for layer, kind in zip(LAYERS, ("batchtopk", "jumprelu"), strict=True):
        x = acts[layer].reshape(-1, D)
        scale = 1.0 / np.abs(x).mean()
        weights = random_weights(10 + layer, scale=scale)
        pre = (x - weights[3] if kind == "batchtopk" else x) @ weights[0] + weights[1]
        threshold = float(np.quantile(pre[pre > 0], 0.67))
        if kind == "batchtopk":
            saes[layer] = load_batchtopk_sae(write_batchtopk(root / f"l{layer}", weights, threshold))
        else:
            threshold = np.full(D_SAE, threshold)
            saes[layer] = load_jumprelu_sae(write_jumprelu(root / f"l{layer}.npz", weights, threshold))
        refs[layer] = (kind, weights, threshold)
    return model, hf, batches, saes, refs


def hf_forward(hf, batch, deltas, metric="ce", grad=False):
    """Metric of the float64 transformers model with `deltas` {layer: [b, t, d]} added to the layers' outputs.

    Each valid row runs on its own without padding (an independent check of our left-padding handling; a padded
    float64 HF batch also yields NaN at all-masked positions). Returns (metric tensor, {layer: activations
    [b, t, d] numpy, zero at padding}, {layer: delta tensor}); deltas are leaves with grads when grad=True.
    """
    b, t = batch["attn_mask"].shape
    leaves = {
        layer: torch.tensor(deltas.get(layer, np.zeros((b, t, D))), dtype=torch.float64, requires_grad=grad)
        for layer in LAYERS
    }
    acts = {layer: np.zeros((b, t, D)) for layer in LAYERS}
    total, count = 0.0, 0
    with torch.set_grad_enabled(grad):
        for r in np.flatnonzero(batch["row_valid"]):
            real = np.flatnonzero(batch["attn_mask"][r])
            handles = []
            for layer in LAYERS:

                def hook(module, args, output, layer=layer, r=r, real=real):
                    acts[layer][r, real] = output[0].detach().numpy()
                    return output + leaves[layer][r, real][None]

                handles.append(hf.model.layers[layer].register_forward_hook(hook))
            ids = torch.tensor(batch["tokens"][r, real], dtype=torch.long)[None]
            logits = hf(input_ids=ids).logits[0]  # [n, V]
            for h in handles:
                h.remove()
            if metric == "ce":
                answer = torch.tensor(batch["loss_mask"][r, real][1:])
                nll = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                total, count = total + (nll * answer).sum(), count + int(answer.sum())
            else:
                last = logits[-1]
                total, count = total + last[int(batch["target"][r])] - last[int(batch["other"][r])], count + 1
    return total / count, acts, leaves


def keep_positions(batch):
    return batch["attn_mask"] & batch["row_valid"][:, None] & ~first_token_mask(batch["attn_mask"])


@pytest.mark.parametrize("metric", ["ce", "logit_diff"])
def test_attribution_matches_torch_autograd(setup, metric):
    """effect_i = mean over batches of sum_{rows, positions not BOS/pad} f_i(x) (W_dec[i] . dmetric/dx), with the
    gradient from torch autograd on the transformers model through forward hooks."""
    model, hf, batches, saes, refs = setup
    got = sae_attribution(model, saes, batches, metric=metric, progress=False)
    want = {layer: np.zeros(D_SAE) for layer in LAYERS}
    for batch in batches:
        value, acts, leaves = hf_forward(hf, batch, {}, metric, grad=True)
        value.backward()
        keep = keep_positions(batch)
        for layer in LAYERS:
            kind, weights, threshold = refs[layer]
            f = ref_encode(kind, weights, threshold, acts[layer])  # [b, t, d_sae]
            along = leaves[layer].grad.numpy() @ np.asarray(weights[2], np.float64).T
            want[layer] += np.einsum("bts,bts->s", f * keep[..., None], along) / len(batches)
    for layer in LAYERS:
        assert got[layer].shape == (D_SAE,)
        assert np.count_nonzero(want[layer]) > 10
        scale = np.abs(want[layer]).max()
        np.testing.assert_allclose(got[layer], want[layer], atol=2e-4 * scale)


@pytest.mark.parametrize("metric", ["ce", "logit_diff"])
def test_attribution_matches_finite_differences(setup, metric):
    """For the largest latents, moving every kept position's activation by eps * f_i(x) * W_dec[i] changes the
    metric (central difference, float64 transformers model) by eps * effect_i to first order."""
    model, hf, batches, saes, refs = setup
    batch = batches[1]
    effects = sae_attribution(model, saes, [batch], metric=metric, progress=False)
    eps = 1e-4
    for layer in LAYERS:
        kind, weights, threshold = refs[layer]
        _, acts, _ = hf_forward(hf, batch, {}, metric)
        f = ref_encode(kind, weights, threshold, acts[layer]) * keep_positions(batch)[..., None]
        for i in np.argsort(-np.abs(effects[layer]))[:3]:
            direction = f[..., i, None] * np.asarray(weights[2][i], np.float64)  # [b, t, d]
            up = hf_forward(hf, batch, {layer: eps * direction}, metric)[0].item()
            down = hf_forward(hf, batch, {layer: -eps * direction}, metric)[0].item()
            fd = (up - down) / (2 * eps)
            assert abs(effects[layer][i]) > 1e-6
            assert fd == pytest.approx(effects[layer][i], rel=2e-3, abs=1e-7), (layer, i)


def test_attribution_errors(setup):
    model, _, batches, saes, _ = setup
    with pytest.raises(ConfigError, match="metric"):
        sae_attribution(model, saes, batches, metric="kl", progress=False)
    no_targets = [{k: v for k, v in b.items() if k not in ("target", "other")} for b in batches]
    with pytest.raises(DataError, match="target, other"):
        sae_attribution(model, saes, no_targets, metric="logit_diff", progress=False)
    with pytest.raises(ConfigError, match="outside"):
        sae_attribution(model, {5: saes[0]}, batches, progress=False)
    with pytest.raises(DataError, match="no batches"):
        sae_attribution(model, saes, [], progress=False)


def test_letter_batches():
    tok = tiny_tokenizer()
    prompts = ["Hello world, Answer:", "I am fine, Answer:", "Answer:"]
    batches = letter_batches(tok, prompts, ["A", "B", "A"], ["B", "A", "B"], batch_size=2, pad_id=tok.pad_token_id)
    a, b = letter_token_id(tok, "A"), letter_token_id(tok, "B")
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["target"], [a, b])
    np.testing.assert_array_equal(batches[0]["other"], [b, a])
    np.testing.assert_array_equal(batches[1]["target"][:1], [a])
    assert not batches[1]["row_valid"][1]
    ids = tok(prompts[0])["input_ids"]
    row = batches[0]["tokens"][0]
    np.testing.assert_array_equal(row[-len(ids) :], ids)  # left-padded: the prompt ends at the last position
    with pytest.raises(DataError, match="one target"):
        letter_batches(tok, prompts, ["A"], ["B"], batch_size=2, pad_id=0)


# ---------------------------------------------------------------------------------------------------------------
# Rankings
# ---------------------------------------------------------------------------------------------------------------


def test_rank_latents_per_layer_and_global(setup):
    scores = {0: np.array([5.0, -1.0, 3.0, 0.0]), 2: np.array([4.0, 10.0, -2.0, 3.0])}
    assert rank_latents(scores, 2) == {0: [0, 2], 2: [1, 0]}
    assert rank_latents(scores, 3, per_layer=False) == {0: [0], 2: [1, 0]}
    assert rank_latents(scores, 4, per_layer=False) == {0: [0, 2], 2: [1, 0]}  # tie at 3.0: layer 0 first
    assert rank_latents(scores, 5, per_layer=False) == {0: [0, 2], 2: [1, 0, 3]}
    assert rank_latents(scores, 1, largest=False) == {0: [1], 2: [2]}
    assert rank_latents(scores, 10, positive_only=True) == {0: [0, 2], 2: [1, 0, 3]}
    assert rank_latents(scores, 10, largest=False, positive_only=True) == {0: [1], 2: [2]}
    assert rank_latents({0: -np.ones(3)}, 2, positive_only=True) == {0: []}
    # Global top-k on real attribution scores = the authors' flattened topk over the concatenated layers.
    model, _, batches, saes, _ = setup
    effects = sae_attribution(model, saes, batches, progress=False)
    ranking = rank_latents(effects, 7, per_layer=False)
    flat = np.concatenate([effects[layer] for layer in LAYERS])
    top = np.argsort(-flat, kind="stable")[:7]
    expected = {layer: [] for layer in LAYERS}
    for j in top:
        expected[LAYERS[j // D_SAE]].append(int(j % D_SAE))
    assert ranking == expected
    per_layer = rank_latents(effects, 7)
    assert all(len(v) == 7 for v in per_layer.values())
    with pytest.raises(ConfigError, match="non-negative"):
        rank_latents(scores, -1)


def test_mean_latent_diff_and_sae_on_diff(setup):
    """Streaming sums over iter_pairs batches equal numpy references on the whole activation sets."""
    model, _, batches, saes, refs = setup
    params = dict(model.params)
    params["table"] = params["table"] + 0.05 * jnp.asarray(np.random.default_rng(5).normal(size=(128, D)), jnp.float32)
    tuned = model.replace_params(params)  # a "fine-tune" that moved the embeddings
    chunks = list(iter_pairs(model, tuned, batches, LAYERS, mask="answer"))
    by_layer = {
        layer: (np.concatenate([c[layer][0] for c in chunks]), np.concatenate([c[layer][1] for c in chunks]))
        for layer in LAYERS
    }
    streamed = mean_latent_diff(saes, chunks)
    whole = mean_latent_diff(saes, by_layer)
    on_diff = sae_on_diff(saes, {layer: t - b for layer, (b, t) in by_layer.items()})
    on_diff_streamed = sae_on_diff(saes, [{layer: c[layer][1] - c[layer][0] for layer in LAYERS} for c in chunks])
    for layer in LAYERS:
        kind, weights, threshold = refs[layer]
        base, ft = by_layer[layer]
        want = ref_encode(kind, weights, threshold, ft).sum(0) - ref_encode(kind, weights, threshold, base).sum(0)
        want_diff = ref_encode(kind, weights, threshold, ft - base).sum(0)
        assert np.abs(want).max() > 0 and np.abs(want_diff).max() > 0
        for got in (streamed[layer], whole[layer]):
            np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
        for got in (on_diff[layer], on_diff_streamed[layer]):
            np.testing.assert_allclose(got, want_diff, atol=1e-3 * np.abs(want_diff).max() + 1e-6)
    # Chunked encoding (padding the last chunk) equals one pass.
    x = by_layer[0][1]
    np.testing.assert_allclose(latent_sums(saes[0], x, chunk=7), latent_sums(saes[0], x), rtol=1e-5, atol=1e-5)
    assert rank_latents(streamed, 5, positive_only=True)[0] == [
        int(i) for i in np.argsort(-streamed[0], kind="stable")[:5] if streamed[0][i] > 0
    ]
    with pytest.raises(DataError, match="expected activations"):
        latent_sums(saes[0], np.zeros((3, D + 1)))
