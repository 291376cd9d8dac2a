"""The intervention family (partial / detached / gradient-only ablation, steering, token masks) against the hooks a
researcher writes on transformers' model.layers[i]: a forward hook for ablate / steer / detached (with
``.detach()``), a tensor ``register_hook`` on the layer output for gradient-only. Logits, input-embedding gradients
and LoRA gradients, for two families, with and without token masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_ablation import next_token_loss, next_token_loss_torch, random_directions
from test_train_step import DEFAULT_LORA, authors_lora_step, make_trainer, relative_error, responses_only_batch

from caft_jax import build_projector, forward, jit_forward, load_model
from caft_jax.model.transformer import embed_tokens
from caft_jax.train_step import intervention_mask

STRENGTH = {0: 0.7, 2: 1.0}  # partial ablation at layer 0
STEER_LAYER, STEER_COEFF = 1, 2.5


def intervention_data(d_model: int, seed: int = 0):
    """(directions, means, strength, steer) of a projector that exercises every field."""
    rng = np.random.default_rng(seed + 10)
    directions = random_directions(d_model, seed)
    means = {layer: 0.1 * rng.normal(size=d_model) for layer in directions}
    steer = {STEER_LAYER: rng.normal(size=d_model) / np.sqrt(d_model)}
    return directions, means, STRENGTH, steer


def add_reference_hooks(hf_model, data, gradient: str, mask: torch.Tensor | None):
    """h <- h - m alpha ((h - mu) Q) Q^T + m c v on the decoder-layer outputs, as a researcher hooks them."""
    directions, means, strength, steer = data
    m = None if mask is None else mask.to(torch.float32)[..., None]
    handles = []
    for layer in sorted(set(directions) | set(steer)):
        q = None
        if layer in directions:
            q = torch.tensor(np.linalg.qr(directions[layer].T)[0], dtype=torch.float32)
        mu = torch.tensor(means.get(layer, np.zeros(hf_model.config.hidden_size)), dtype=torch.float32)
        alpha = strength.get(layer, 0.0)
        v = torch.tensor(steer[layer], dtype=torch.float32) * STEER_COEFF if layer in steer else None

        def hook(module, inputs, output, q=q, mu=mu, alpha=alpha, v=v):
            h = output[0] if isinstance(output, tuple) else output
            out = h
            if q is not None:
                correction = alpha * (((h - mu) @ q) @ q.T)
                correction = correction if m is None else m * correction
                if gradient == "through":
                    out = h - correction
                elif gradient == "detached":
                    out = h - correction.detach()
                else:  # gradient-only: the forward stays, the gradient arriving at h is projected

                    def project(g, q=q, alpha=alpha):
                        step = alpha * ((g @ q) @ q.T)
                        return g - (step if m is None else m * step)

                    h.register_hook(project)
            if v is not None:
                out = out + (v if m is None else m * v)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handles.append(hf_model.model.layers[layer].register_forward_hook(hook))
    return handles


def build(data, spec, gradient: str, positions: str = "all"):
    directions, means, strength, steer = data
    return build_projector(
        directions, spec.n_layers, spec.d_model, means=means, strength=strength, steer=steer,
        steer_coeff=STEER_COEFF, gradient=gradient, positions=positions,
    )  # fmt: skip


def position_mask(mask: np.ndarray) -> np.ndarray:
    """A 'response' mask: the second half of each row's real tokens."""
    out = np.zeros_like(mask)
    for r, row in enumerate(mask):
        real = np.flatnonzero(row)
        out[r, real[len(real) // 2 :]] = True
    return out


def batch(t: int = 14):
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 128, size=(2, t))
    mask = np.ones((2, t), bool)
    mask[1, :4] = False
    tokens[1, :4] = 0
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("gradient", ["through", "detached", "gradient_only"])
@pytest.mark.parametrize("masked", [False, True])
def test_each_mode_matches_the_hooked_transformers_model(family, gradient, masked, tiny_models):
    model_dir, hf_model = tiny_models[family]
    model = load_model(model_dir)
    data = intervention_data(model.spec.d_model)
    projector = build(data, model.spec, gradient)
    tokens, mask, positions = batch()
    where = position_mask(mask) if masked else None

    handles = add_reference_hooks(hf_model, data, gradient, None if where is None else torch.tensor(where))
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
            model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask), projector=projector, embeds=emb,
            intervention_mask=None if where is None else jnp.asarray(where),
        ).logits  # fmt: skip
        return next_token_loss(logits, jnp.asarray(tokens), jnp.asarray(mask)), logits

    (_, logits), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(embed_tokens(model, jnp.asarray(tokens)))
    assert np.abs(np.asarray(logits) - ref_logits)[mask].max() <= 1e-4
    assert relative_error(grad, ref_grad) <= 1e-4
    # the comparison is not vacuous: the intervention changed the logits (all modes steer) and the gradient
    plain = np.asarray(jit_forward(model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask)).logits)
    assert np.abs(plain - ref_logits)[mask].max() > 1e-3


@pytest.mark.parametrize(
    ("family", "gradient", "positions"),
    [("llama", "through", "response"), ("gemma2", "detached", "prompt"), ("llama", "gradient_only", "all")],
)
def test_lora_gradients_match_the_hooked_peft_model(family, gradient, positions, tiny_models):
    """The train step's loss and LoRA gradients under each mode and token rule equal transformers + peft + hooks."""
    model_dir, _ = tiny_models[family]
    trainer = make_trainer(model_dir, DEFAULT_LORA)
    lora = jax.tree.map(lambda x: x, trainer.init_state(seed=3).trainable)
    rng = np.random.default_rng(1)
    for sub in lora.values():
        for ab in sub.values():
            ab["b"] = jnp.asarray(rng.normal(size=ab["b"].shape) * 0.05, jnp.float32)
    data = intervention_data(trainer.model.spec.d_model, seed=2)
    projector = build(data, trainer.model.spec, gradient, positions)
    rows = responses_only_batch(t=20)
    jbatch = {k: jnp.asarray(v) for k, v in rows.items()}
    loss, _, grads = jax.jit(trainer.loss_and_grads)(lora, trainer.model.params, jbatch, projector, jax.random.key(0))
    where = intervention_mask(projector, {k: v[0] for k, v in rows.items()})
    where = None if where is None else torch.tensor(np.asarray(where))
    ref_loss, ref_grads = authors_lora_step(
        model_dir,
        DEFAULT_LORA,
        lora,
        data[0],
        rows,
        add_hooks=lambda hf, _: add_reference_hooks(hf, data, gradient, where),
    )
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss)
    for (sub, kernel, layer), theirs in ref_grads.items():
        for part in ("a", "b"):
            assert relative_error(grads[sub][kernel][part][layer], theirs[part]) <= 1e-4, (sub, kernel, layer, part)


def test_modes_differ_where_they_should(tiny_models):
    """Detached = through in the forward, gradient-only = plain in the forward; the gradients tell them apart."""
    model = load_model(tiny_models["llama"][0])
    directions = random_directions(model.spec.d_model)
    tokens, mask, _ = batch()
    args = dict(attn_mask=jnp.asarray(mask))
    grads, logits = {}, {}
    for gradient in ("through", "detached", "gradient_only"):
        projector = build_projector(directions, model.spec.n_layers, model.spec.d_model, gradient=gradient)

        def loss_fn(emb, projector=projector):
            out = forward(model, jnp.asarray(tokens), projector=projector, embeds=emb, **args).logits
            return next_token_loss(out, jnp.asarray(tokens), jnp.asarray(mask)), out

        (_, logits[gradient]), grads[gradient] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            embed_tokens(model, jnp.asarray(tokens))
        )
    plain = jit_forward(model, jnp.asarray(tokens), **args).logits
    np.testing.assert_array_equal(logits["through"], logits["detached"])
    # the same values up to XLA's fusion of a different program (the monitor's product is extra)
    np.testing.assert_allclose(logits["gradient_only"], plain, rtol=0, atol=1e-5)
    for a, b in (("through", "detached"), ("through", "gradient_only"), ("detached", "gradient_only")):
        assert relative_error(grads[a], grads[b]) > 1e-3, (a, b)


def test_default_fields_are_bit_identical_to_plain_caft(tiny_models):
    """build_projector's strength 1 / no steering / all positions is the two-array CAFT projector (no strength or
    steering arrays: the regression bar of the default run) and computes it bit for bit; strength 1 carried as an
    array is the same update up to XLA:CPU's fusion (<= 1e-6)."""
    from caft_jax.projector import Projector

    model_dir, _ = tiny_models["gemma2"]
    trainer = make_trainer(model_dir, DEFAULT_LORA)
    spec = trainer.model.spec
    full = build_projector(random_directions(spec.d_model), spec.n_layers, spec.d_model)
    bare = Projector(basis=full.basis, offset=full.offset)
    assert full.strength is None and full.steer is None and full.steer_coeff is None
    ones = full.replace(strength=jnp.ones((spec.n_layers,), jnp.float32))
    rows = {k: jnp.asarray(v) for k, v in responses_only_batch(t=20).items()}
    state = trainer.init_state(seed=0)
    step = jax.jit(trainer.loss_and_grads)
    for a, b in zip(
        jax.tree.leaves(step(state.trainable, trainer.model.params, rows, full, jax.random.key(0))),
        jax.tree.leaves(step(state.trainable, trainer.model.params, rows, bare, jax.random.key(0))),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(step(state.trainable, trainer.model.params, rows, ones, jax.random.key(0))),
        jax.tree.leaves(step(state.trainable, trainer.model.params, rows, bare, jax.random.key(0))),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_new_intervention_values_do_not_recompile(tiny_models):
    model = load_model(tiny_models["mistral"][0])
    spec = model.spec
    fn = jax.jit(lambda m, t, p, w: forward(m, t, projector=p, intervention_mask=w).logits)
    tokens, mask, _ = batch()
    outs = []
    for seed, alpha, coeff in ((0, 0.9, 0.5), (1, 0.3, 4.0), (2, 0.0, -2.0)):
        data = intervention_data(spec.d_model, seed)
        projector = build_projector(
            data[0], spec.n_layers, spec.d_model, means=data[1], strength=alpha, steer=data[3], steer_coeff=coeff,
            k_max=4,
        )  # fmt: skip
        where = position_mask(mask) if seed % 2 else mask
        outs.append(np.asarray(fn(model, jnp.asarray(tokens), projector, jnp.asarray(where))))
    assert fn._cache_size() == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_projection_monitor_reports_what_the_ablation_removes(tiny_models):
    """The step's projection stats equal mean / max |(h - mu) . q| of the hidden states entering the ablation."""
    from caft_jax import Capture
    from caft_jax.fit import projection_record

    model_dir, _ = tiny_models["llama"]
    trainer = make_trainer(model_dir, DEFAULT_LORA)
    spec = trainer.model.spec
    directions = {1: np.random.default_rng(0).normal(size=(2, spec.d_model))}
    projector = build_projector(directions, spec.n_layers, spec.d_model, k_max=3)
    rows = responses_only_batch(t=20)
    state = trainer.init_state(seed=0)
    _, metrics = trainer.step(state, rows, projector)
    record = projection_record(np.asarray(metrics["projection"]), projector.active_layers())
    assert list(record) == ["1"]
    # reference: layer 1's output without the ablation there (layer 0 is untouched), projected on Q
    captured = jit_forward(
        trainer.model, jnp.asarray(rows["tokens"][0]), attn_mask=jnp.asarray(rows["attn_mask"][0]),
        capture=Capture(layers=(1,)), logits=False,
    ).captured[0]  # fmt: skip
    coeff = np.abs(np.asarray(captured) @ np.asarray(projector.basis[1, :, :2]))[rows["attn_mask"][0]]
    np.testing.assert_allclose(record["1"]["mean"], coeff.mean(), rtol=1e-5)
    np.testing.assert_allclose(record["1"]["max"], coeff.max(), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gradient": "backwards"}, "Unknown intervention gradient 'backwards'"),
        ({"positions": "answer"}, "Unknown intervention positions 'answer'"),
        ({"strength": float("nan")}, "strength must be finite"),
        ({"steer": {0: np.ones(3)}}, "Steering vector for layer 0 must be a finite vector of shape (8,)"),
        ({"steer": {9: np.ones(8)}}, "out of range"),
        ({"strength": {7: 0.5}}, "out of range"),
    ],
)
def test_malformed_intervention_errors(kwargs, message):
    from caft_jax import ProjectorError

    with pytest.raises(ProjectorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_projector({0: np.eye(8)[:1]}, 4, 8, **kwargs)


def test_train_recipe_keys_build_the_intervention(tmp_path):
    """train.py's ablation.strength / steer_coeff / gradient / positions reach the projector it trains with."""
    from types import SimpleNamespace

    from caft_jax.ablation_spec import save_ablation_spec
    from caft_jax.cli.train import build_projector_from_config
    from caft_jax.config import load_config

    rng = np.random.default_rng(0)
    spec_file = save_ablation_spec(tmp_path / "spec.safetensors", {1: rng.normal(size=(2, 8))})
    overrides = [f"ablation.spec={spec_file}", "ablation.strength=0.5", "ablation.steer_coeff=3",
                 "ablation.gradient=detached", "ablation.positions=response"]  # fmt: skip
    spec = SimpleNamespace(n_layers=3, d_model=8)  # what the loader checks the spec against
    projector = build_projector_from_config(load_config(None, overrides), spec)
    assert (projector.gradient, projector.positions) == ("detached", "response")
    np.testing.assert_allclose(np.asarray(projector.strength), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(np.asarray(projector.steer_coeff), [0.0, 3.0, 0.0])
    first = np.asarray(projector.steer[1])
    np.testing.assert_allclose(np.linalg.norm(first), 1.0, rtol=1e-6)
    # the steering vector is the spec layer's first direction (unit length), inside the ablated span
    basis = np.asarray(projector.basis[1, :, :2])
    np.testing.assert_allclose(basis @ (basis.T @ first), first, atol=1e-6)
    assert projector.active_layers() == [1]
