"""The CAFT train step: LoRA/full modes, the authors' PyTorch step as reference, accumulation, schedule, NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_ablation import add_authors_hooks, random_directions

from caft_jax import build_projector, load_model
from caft_jax.lora import LoraConfig, lora_param_count
from caft_jax.optim import OptimConfig, learning_rate_schedule
from caft_jax.sharding import make_mesh
from caft_jax.train_step import CaftTrainer

HF_NAMES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def responses_only_batch(vocab=128, accum=1, rows=2, t=20, seed=0):
    """Chat-like rows: left padding, a prompt, then a 'response' whose tokens carry the loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(accum, rows, t)).astype(np.int32)
    attn = np.ones_like(tokens, bool)
    loss = np.zeros_like(tokens, bool)
    for a in range(accum):
        for r in range(rows):
            pad = int(rng.integers(0, 5))
            attn[a, r, :pad] = False
            tokens[a, r, :pad] = 0
            loss[a, r, pad + int(rng.integers(4, 10)) :] = True  # response after the prompt
    return {"tokens": tokens, "attn_mask": attn, "loss_mask": loss}


DEFAULT_LORA = LoraConfig(rank=4, alpha=8, rslora=True)


def make_trainer(model_dir, lora=DEFAULT_LORA, lr=1e-3, total=10, **kw):
    mesh = make_mesh((1, -1, 1))
    model = load_model(model_dir, mesh=mesh)
    return CaftTrainer(model, OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.01), total, mesh, lora=lora, **kw)


@pytest.mark.parametrize("family, t", [("llama", 20), ("gemma2", 20), ("llama", 256), ("gemma2", 256)])
def test_lora_step_matches_authors_pytorch_step(family, t, tiny_models):
    """Loss and LoRA gradients equal transformers + peft LoRA + forward hooks on model.layers[i] (<= 1e-4 rel).

    t = 256 takes the block-causal attention path with its hand-written backward (2 query blocks of 128; Gemma-2's
    sliding window and attention soft-cap inside it).
    """
    model_dir, _ = tiny_models[family]
    cfg = LoraConfig(rank=4, alpha=8, rslora=True)
    trainer = make_trainer(model_dir, cfg)
    state = trainer.init_state(seed=3)
    rng = np.random.default_rng(1)
    # non-zero B so the gradients reach A too
    lora = jax.tree.map(lambda x: x, state.trainable)
    for sub in lora.values():
        for ab in sub.values():
            ab["b"] = jnp.asarray(rng.normal(size=ab["b"].shape) * 0.05, jnp.float32)
    spec = trainer.model.spec
    directions = random_directions(spec.d_model)
    projector = build_projector(directions, spec.n_layers, spec.d_model)
    batch = responses_only_batch(t=t)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, _, grads = jax.jit(trainer.loss_and_grads)(
        lora, trainer.model.params, jbatch, projector, jax.random.PRNGKey(0)
    )

    ref_loss, ref_grads = authors_lora_step(model_dir, cfg, lora, directions, batch)
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss)
    for (sub, kernel, layer), theirs in ref_grads.items():
        for part in ("a", "b"):
            rel = relative_error(grads[sub][kernel][part][layer], theirs[part])
            assert rel <= 1e-4, (sub, kernel, layer, part, rel)


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12))


def authors_lora_step(
    model_dir, cfg: LoraConfig, lora: dict, directions: dict, batch: dict, dtype=torch.float32, add_hooks=None
):
    """Loss and LoRA gradients of the authors' stack: transformers + peft LoRA + forward hooks on model.layers[i].

    ``lora`` holds our weights ({sub: {kernel: {"a": [L, in, r], "b": [L, r, out]}}}), copied into peft's
    adapters; the model runs in ``dtype`` (peft keeps its adapters in float32, as it does by default);
    ``add_hooks(hf_model, directions)`` replaces the authors' CAFT hook (other interventions). Returns
    (loss, {(sub, kernel, layer): {"a": [in, r], "b": [r, out]}}) in our layout, as float32 numpy.
    """
    import peft
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    pcfg = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=cfg.rslora, lora_dropout=0.0, target_modules=list(HF_NAMES)
    )
    ref = peft.get_peft_model(ref, pcfg)
    adapters = {}
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name.endswith(tuple(HF_NAMES)) and hasattr(mod, "lora_A"):
                layer, kernel = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-1]
                sub = HF_NAMES[kernel].replace("self_attn", "attn")
                ab = lora[sub][kernel]
                mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(ab["a"][layer], np.float32).T))
                mod.lora_B["default"].weight.copy_(torch.tensor(np.asarray(ab["b"][layer], np.float32).T))
                adapters[(sub, kernel, layer)] = mod
    handles = (add_hooks or add_authors_hooks)(ref.base_model.model, directions)
    tokens = torch.tensor(batch["tokens"][0].astype(np.int64))
    attn, lmask = torch.tensor(batch["attn_mask"][0]), torch.tensor(batch["loss_mask"][0])
    positions = torch.clamp(attn.long().cumsum(-1) - 1, min=0)
    logits = ref(input_ids=tokens, attention_mask=attn.long(), position_ids=positions).logits.float()
    labels = torch.where(lmask, tokens.long(), -100)[:, 1:]
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
    ref_loss.backward()
    for h in handles:
        h.remove()
    grads = {
        key: {
            "a": mod.lora_A["default"].weight.grad.float().numpy().T,
            "b": mod.lora_B["default"].weight.grad.float().numpy().T,
        }
        for key, mod in adapters.items()
    }
    return float(ref_loss), grads


def test_lora_leaves_base_unchanged_and_learns(tiny_models):
    trainer = make_trainer(tiny_models["qwen2"][0], lr=3e-2, total=30)
    base = jax.tree.map(np.asarray, trainer.model.params)
    state = trainer.init_state()
    assert sum(x.size for x in jax.tree.leaves(state.trainable)) == lora_param_count(trainer.model, trainer.lora)
    # the optimiser state holds moments for the LoRA tree only
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * lora_param_count(trainer.model, trainer.lora)
    batch = responses_only_batch()
    losses = []
    for _ in range(25):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), base, trainer.model.params)
    assert losses[-1] < 0.5 * losses[0], losses  # a small batch is memorised


def test_lora_step_zero_equals_base_model(tiny_models):
    from caft_jax import jit_forward

    trainer = make_trainer(tiny_models["mistral"][0])
    state = trainer.init_state()
    tokens = jnp.asarray(responses_only_batch()["tokens"][0])
    base = jit_forward(trainer.model, tokens).logits
    with_lora = jit_forward(trainer.model, tokens, lora=state.trainable, lora_settings=trainer.lora.settings()).logits
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_trainable_count_formula_all_targets(tiny_models):
    trainer = make_trainer(
        tiny_models["llama"][0], LoraConfig(rank=3, alpha=6, targets=("q", "k", "v", "o", "gate", "up", "down"))
    )
    s = trainer.model.spec
    expected = (
        s.n_layers
        * 3
        * ((s.d_model + s.q_dim) + 2 * (s.d_model + s.kv_dim) + (s.q_dim + s.d_model) + 3 * (s.d_model + s.d_ff))
    )
    state = trainer.init_state()
    assert (
        sum(x.size for x in jax.tree.leaves(state.trainable))
        == expected
        == lora_param_count(trainer.model, trainer.lora)
    )


def test_full_finetuning_trains_every_parameter(tiny_models):
    trainer = make_trainer(tiny_models["gemma2"][0], lora=None, lr=1e-3)
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, state.trainable)
    assert jax.tree.structure(before) == jax.tree.structure(jax.tree.map(np.asarray, trainer.model.params))
    state, metrics = trainer.step(state, responses_only_batch())
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, state.trainable)
    assert all(jax.tree.leaves(changed))


def test_gradient_accumulation_equals_one_big_batch(tiny_models):
    trainer = make_trainer(tiny_models["llama"][0])
    state = trainer.init_state()
    big = responses_only_batch(accum=1, rows=4)
    split = {k: v.reshape(2, 2, -1) for k, v in big.items()}
    args = (state.trainable, trainer.model.params)
    loss1, n1, g1 = jax.jit(trainer.loss_and_grads)(*args, big, None, jax.random.PRNGKey(0))
    loss2, n2, g2 = jax.jit(trainer.loss_and_grads)(*args, split, None, jax.random.PRNGKey(0))
    assert float(n1) == float(n2)
    np.testing.assert_allclose(float(loss1), float(loss2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g2)


def test_non_finite_step_leaves_state_unchanged(tiny_models):
    trainer = make_trainer(tiny_models["llama"][0])
    state = trainer.init_state()
    state.trainable["attn"]["q_proj"]["a"] = state.trainable["attn"]["q_proj"]["a"].at[0, 0, 0].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    state, metrics = trainer.step(state, responses_only_batch())
    assert not bool(metrics["finite"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, state)


@pytest.mark.parametrize("warmup_ratio, schedule", [(0.5, "linear"), (0.0, "linear"), (0.2, "constant")])
def test_schedule_matches_transformers(warmup_ratio, schedule):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    total = 40
    cfg = OptimConfig(lr=5e-6, warmup_ratio=warmup_ratio, schedule=schedule)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    warm = cfg.warmup(total)
    if schedule == "linear":
        sched = get_linear_schedule_with_warmup(opt, warm, total)
    else:
        sched = get_constant_schedule_with_warmup(opt, warm)
    ours = learning_rate_schedule(cfg, total)
    for step in range(total):
        assert abs(float(ours(step)) - opt.param_groups[0]["lr"]) <= 1e-12 + 1e-6 * 5e-6
        opt.step()
        sched.step()


def test_recipes_in_configs_are_the_papers():
    from caft_jax.config import load_config

    qwen = load_config("configs/em_qwen2.5_coder_32b.yaml")
    assert (qwen.lora.rank, qwen.lora.alpha, qwen.lora.rslora, len(qwen.lora.targets)) == (32, 64, True, 7)
    assert abs(qwen.lora.scale - 64 / 32**0.5) < 1e-12
    assert (qwen.optim.lr, qwen.optim.warmup_steps, qwen.optim.weight_decay, qwen.optim.schedule) == (
        1e-5,
        5,
        0.01,
        "linear",
    )
    assert (qwen.batch_size, qwen.grad_accum, qwen.epochs, qwen.data.max_len) == (2, 8, 1, 2048)
    assert qwen.ablation.layers == (12, 32, 50)
    mistral = load_config("configs/em_mistral_small_24b.yaml")
    assert mistral.ablation.layers == (10, 20, 30) and mistral.lora == qwen.lora and mistral.optim == qwen.optim
    gemma = load_config("configs/spurious_gemma2_2b.yaml")
    assert gemma.lora is None
    assert (gemma.optim.lr, gemma.optim.betas, gemma.optim.weight_decay, gemma.optim.warmup_ratio) == (
        5e-6,
        (0.9, 0.95),
        0.01,
        0.5,
    )
    assert (gemma.batch_size, gemma.grad_accum, gemma.epochs, gemma.dtype) == (16, 1, 4, "bfloat16")


def test_lora_dropout_is_random_but_reproducible(tiny_models):
    trainer = make_trainer(tiny_models["llama"][0], LoraConfig(rank=4, alpha=8, dropout=0.5))
    state = trainer.init_state()
    lora = jax.tree.map(lambda x: x + 0.05, state.trainable)  # non-zero B, so dropout changes the output
    batch = {k: jnp.asarray(v) for k, v in responses_only_batch().items()}
    fn = jax.jit(trainer.loss_and_grads)
    a = float(fn(lora, trainer.model.params, batch, None, jax.random.PRNGKey(0))[0])
    b = float(fn(lora, trainer.model.params, batch, None, jax.random.PRNGKey(0))[0])
    c = float(fn(lora, trainer.model.params, batch, None, jax.random.PRNGKey(1))[0])
    assert a == b and a != c


def test_bf16_compute_with_fp32_trainable_params(tiny_models):
    mesh = make_mesh((1, -1, 1))
    model = load_model(tiny_models["qwen2"][0], dtype="bfloat16", mesh=mesh)
    trainer = CaftTrainer(model, OptimConfig(lr=1e-2, warmup_steps=0), 10, mesh, lora=DEFAULT_LORA)
    state = trainer.init_state()
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
    losses = []
    for _ in range(5):
        state, metrics = trainer.step(state, responses_only_batch())
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
