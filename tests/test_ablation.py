"""The ablation projector against the authors' method: transformers + register_forward_hook on model.layers[i]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES
from test_parity import left_padded_batch

from caft_jax import Capture, ProjectorError, build_projector, empty_projector, forward, jit_forward, load_model
from caft_jax.model.transformer import embed_tokens

LAYERS = {0: 2, 2: 3}  # layer -> number of directions (different ranks exercise the zero padding)


def random_directions(d_model: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=(k, d_model)) for layer, k in LAYERS.items()}


def add_authors_hooks(hf_model, directions, means=None):
    """The authors' CAFT hook: h <- h - ((h - mu) Q) Q^T on the decoder-layer output, all positions, no detach."""
    handles = []
    for layer, dirs in directions.items():
        q, _ = np.linalg.qr(dirs.T)  # [d, k], as the authors' QR of the transposed decoder rows
        q = torch.tensor(q, dtype=torch.float32)
        mu = torch.tensor(means[layer], dtype=torch.float32) if means else torch.zeros(q.shape[0])

        def hook(module, inputs, output, q=q, mu=mu):
            h = output[0] if isinstance(output, tuple) else output
            q, mu = q.to(h.dtype), mu.to(h.dtype)  # a bf16 model runs the hook in bf16
            h = h - ((h - mu) @ q) @ q.T
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(hf_model.model.layers[layer].register_forward_hook(hook))
    return handles


def next_token_loss_torch(logits, tokens, mask):
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    valid = mask[:, 1:] & mask[:, :-1]
    return (nll * valid).sum() / valid.sum()


def next_token_loss(logits, tokens, mask):
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    valid = mask[:, 1:] & mask[:, :-1]
    return (nll * valid).sum() / valid.sum()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mean_ablation", [False, True])
def test_projector_matches_authors_hooks(family, mean_ablation, tiny_models):
    model_dir, hf_model = tiny_models[family]
    model = load_model(model_dir)
    d = model.spec.d_model
    directions = random_directions(d)
    means = {layer: np.random.default_rng(layer).normal(size=d) for layer in LAYERS} if mean_ablation else None
    projector = build_projector(directions, model.spec.n_layers, d, means=means)
    tokens, mask, positions = left_padded_batch(128, t=48)

    # transformers with the authors' hooks: logits and d loss / d inputs_embeds
    handles = add_authors_hooks(hf_model, directions, means)
    try:
        embeds = hf_model.model.embed_tokens(torch.tensor(tokens)).detach().requires_grad_(True)
        out = hf_model(
            inputs_embeds=embeds,
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
        next_token_loss_torch(out.logits, torch.tensor(tokens), torch.tensor(mask)).backward()
        ref_logits, ref_grad = out.logits.detach().numpy(), embeds.grad.numpy()
    finally:
        for h in handles:
            h.remove()

    def loss_fn(emb):
        logits = forward(
            model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask), projector=projector, embeds=emb
        ).logits
        return next_token_loss(logits, jnp.asarray(tokens), jnp.asarray(mask)), logits

    emb0 = embed_tokens(model, jnp.asarray(tokens))
    (_, logits), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(emb0)
    assert np.abs(np.asarray(logits) - ref_logits)[mask].max() <= 1e-4
    grad = np.asarray(grad)
    rel = np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)
    assert rel <= 1e-4, rel
    # and the hooks really changed the model (the comparison is not vacuous)
    plain = np.asarray(jit_forward(model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask)).logits)
    assert np.abs(plain - ref_logits)[mask].max() > 1e-3


def test_empty_projector_is_bit_identical(tiny_models):
    model = load_model(tiny_models["gemma2"][0])
    tokens = jnp.asarray(left_padded_batch(128, t=40)[0])
    plain = jit_forward(model, tokens).logits
    empty = jit_forward(
        model, tokens, projector=empty_projector(model.spec.n_layers, model.spec.d_model, k_max=4)
    ).logits
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(empty))


@pytest.mark.parametrize("site", ["resid_post", "resid_mid"])
def test_ablated_component_is_removed(site, tiny_models):
    """After projection the captured residual has no component in the ablated subspace: ||Q^T h|| <= 1e-5 ||h||."""
    model = load_model(tiny_models["llama"][0])
    directions = random_directions(model.spec.d_model, seed=3)
    projector = build_projector(directions, model.spec.n_layers, model.spec.d_model, site=site)
    tokens = jnp.asarray(left_padded_batch(128, t=40)[0])
    capture = Capture(layers=tuple(LAYERS), site=site)
    ablated = jit_forward(model, tokens, projector=projector, capture=capture).captured
    plain = jit_forward(model, tokens, capture=capture).captured
    for slot, layer in enumerate(LAYERS):
        q = np.asarray(projector.basis[layer])
        h = np.asarray(ablated[slot]).reshape(-1, model.spec.d_model)
        assert np.linalg.norm(h @ q) <= 1e-5 * np.linalg.norm(h)
        h_plain = np.asarray(plain[slot]).reshape(-1, model.spec.d_model)
        assert np.linalg.norm(h_plain @ q) > 1e-2 * np.linalg.norm(h_plain)  # there was something to remove


def test_mean_ablation_sets_subspace_to_the_mean(tiny_models):
    model = load_model(tiny_models["qwen2"][0])
    d = model.spec.d_model
    directions = random_directions(d, seed=4)
    means = {layer: np.random.default_rng(9).normal(size=d) for layer in LAYERS}
    projector = build_projector(directions, model.spec.n_layers, d, means=means)
    tokens = jnp.asarray(left_padded_batch(128, t=24)[0])
    captured = jit_forward(model, tokens, projector=projector, capture=Capture(layers=tuple(LAYERS))).captured
    for slot, layer in enumerate(LAYERS):
        q = np.asarray(projector.basis[layer])
        coeff = np.asarray(captured[slot]).reshape(-1, d) @ q
        np.testing.assert_allclose(coeff, np.broadcast_to(means[layer] @ q, coeff.shape), atol=1e-4)


def test_new_projector_values_do_not_recompile(tiny_models):
    model = load_model(tiny_models["mistral"][0])
    spec = model.spec
    fn = jax.jit(lambda m, t, p: forward(m, t, projector=p).logits)
    tokens = jnp.asarray(left_padded_batch(128, t=16)[0])
    outs = []
    for seed in range(3):
        projector = build_projector(random_directions(spec.d_model, seed), spec.n_layers, spec.d_model, k_max=4)
        outs.append(np.asarray(fn(model, tokens, projector)))
    # also a projector on different layers and a mean offset: same shapes, so still no recompile
    other = build_projector(
        {1: np.ones((1, spec.d_model))}, spec.n_layers, spec.d_model, k_max=4, means={1: np.ones(spec.d_model)}
    )
    outs.append(np.asarray(fn(model, tokens, other)))
    assert fn._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])  # the values really were different


@pytest.mark.parametrize(
    "directions, kwargs, message",
    [
        ({5: np.ones((1, 8))}, {}, "out of range"),
        ({-1: np.ones((1, 8))}, {}, "out of range"),
        ({0: np.ones((1, 7))}, {}, "d_model is 8"),
        ({0: np.full((1, 8), np.nan)}, {}, "NaN or inf"),
        ({0: np.stack([np.arange(8.0), 2 * np.arange(8.0)])}, {}, "linearly dependent"),
        ({0: np.zeros((1, 8))}, {}, "linearly dependent"),
        ({0: np.ones((2, 2, 8))}, {}, "expected [k, d_model=8]"),
        ({0: np.eye(8)[:3]}, {"k_max": 2}, "raise k_max"),
        ({0: np.eye(8)[:1]}, {"site": "resid_pre"}, "Unknown intervention site"),
        ({0: np.eye(8)[:1]}, {"means": {0: np.ones(3)}}, "Mean offset for layer 0"),
    ],
)
def test_malformed_projector_errors(directions, kwargs, message):
    with pytest.raises(ProjectorError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_projector(directions, 4, 8, **kwargs)


def test_projector_is_orthonormal_and_zero_padded():
    rng = np.random.default_rng(0)
    projector = build_projector({1: rng.normal(size=(3, 16)), 3: rng.normal(size=(1, 16))}, 4, 16, k_max=5)
    basis = np.asarray(projector.basis)
    assert basis.shape == (4, 16, 5)
    np.testing.assert_allclose(basis[1, :, :3].T @ basis[1, :, :3], np.eye(3), atol=1e-6)
    assert np.all(basis[0] == 0) and np.all(basis[1, :, 3:] == 0) and np.all(basis[3, :, 1:] == 0)
    assert list(projector.ranks()) == [0, 3, 0, 1]


@pytest.mark.parametrize("site", ["resid_post", "resid_mid"])
def test_capture_delta_gradient_is_the_activation_gradient(site, tiny_models):
    """d loss / d capture_delta equals a finite difference of the loss along a random residual perturbation."""
    model = load_model(tiny_models["gemma2"][0])
    tokens = jnp.asarray(left_padded_batch(128, t=12)[0])
    capture = Capture(layers=(0, 2), site=site)
    mask = jnp.ones(tokens.shape, bool)

    def loss(delta):
        out = forward(model, tokens, capture=capture, capture_delta=delta)
        return next_token_loss(out.logits, tokens, mask)

    zero = jnp.zeros((2, *tokens.shape, model.spec.d_model))
    grad = jax.grad(loss)(zero)
    direction = jax.random.normal(jax.random.PRNGKey(0), zero.shape)
    eps = 1e-2
    fd = (loss(eps * direction) - loss(-eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=2e-3)
    # a zero delta changes nothing
    np.testing.assert_array_equal(
        np.asarray(forward(model, tokens, capture=capture, capture_delta=zero).logits),
        np.asarray(forward(model, tokens, capture=capture).logits),
    )
