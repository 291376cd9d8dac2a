"""Sequence packing: several records per row with segment ids compute exactly what each record computes alone.

References: each record run alone through transformers (logits), and our unpacked left-padded batches (logits,
loss and LoRA gradients, with the ablation projector on), for Llama (GQA, llama3 RoPE scaling) and Gemma-2
(sliding window 8, soft-caps, sandwich norms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_ablation import random_directions
from test_train_step import relative_error

from caft_jax import build_projector, jit_forward, load_model
from caft_jax import data as D
from caft_jax.errors import ConfigError
from caft_jax.lora import LoraConfig
from caft_jax.model.transformer import segment_positions
from caft_jax.optim import OptimConfig
from caft_jax.sharding import make_mesh
from caft_jax.train_step import CaftTrainer

LENGTHS = (70, 101, 50, 33)  # 254 tokens: one packed row of 256 (the block-causal attention path)


def records(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[D.Example]:
    """Chat-like examples: a prompt, then a response whose tokens carry the loss."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, size=n).tolist()
        prompt = int(rng.integers(5, n // 2))
        out.append((ids, [False] * prompt + [True] * (n - prompt)))
    return out


def test_segment_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_logits_equal_each_record_alone(family, tiny_models):
    """Per record: packed logits against transformers on the record alone, and against our unpacked forward."""
    model_dir, hf_model = tiny_models[family]
    model = load_model(model_dir)
    examples = records(model.spec.vocab_size)
    batch = D.pack_rows([examples], 256, pad_id=0, num_rows=1)
    packed = jit_forward(
        model,
        jnp.asarray(batch["tokens"]),
        attn_mask=jnp.asarray(batch["attn_mask"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
    ).logits[0]
    col = 0
    for ids, _ in examples:
        got = np.asarray(packed[col : col + len(ids)])
        with torch.no_grad():
            ref = hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        alone = np.asarray(jit_forward(model, jnp.asarray([ids])).logits[0])
        assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
        assert np.abs(got - alone).max() <= 1e-5, np.abs(got - alone).max()
        col += len(ids)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_loss_and_lora_gradients_equal_unpacked(family, tiny_models):
    """The token-mean loss and the LoRA gradients of one packed row equal those of the same records left-padded."""
    mesh = make_mesh((1, -1, 1))
    model = load_model(tiny_models[family][0], mesh=mesh)
    lora = LoraConfig(rank=4, alpha=8)
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    packed_trainer = CaftTrainer(model, optim, 10, mesh, lora=lora, packed=True)
    padded_trainer = CaftTrainer(model, optim, 10, mesh, lora=lora)
    weights = packed_trainer.init_state(seed=1).trainable
    rng = np.random.default_rng(2)
    for sub in weights.values():
        for ab in sub.values():  # non-zero B, so the gradients reach A too
            ab["b"] = jnp.asarray(rng.normal(size=ab["b"].shape) * 0.05, jnp.float32)
    spec = model.spec
    projector = build_projector(random_directions(spec.d_model), spec.n_layers, spec.d_model)
    examples = records(spec.vocab_size)
    packed = D.pack_rows([examples], 256, pad_id=0, num_rows=1)
    padded = D.pad_and_stack([e[0] for e in examples], [e[1] for e in examples], 128, pad_id=0)

    def loss_and_grads(trainer, batch):
        arrays = {k: jnp.asarray(batch[k])[None] for k in trainer.batch_keys}  # [accum=1, b, t]
        fn = jax.jit(trainer.loss_and_grads)
        return fn(weights, model.params, arrays, projector, jax.random.PRNGKey(0))

    loss_p, count_p, grads_p = loss_and_grads(packed_trainer, packed)
    loss_u, count_u, grads_u = loss_and_grads(padded_trainer, padded)
    assert float(count_p) == float(count_u) == sum(sum(m[1:]) for _, m in examples)
    assert abs(float(loss_p) - float(loss_u)) <= 1e-5 * abs(float(loss_u))
    rels = jax.tree.leaves(jax.tree.map(relative_error, grads_p, grads_u))
    assert max(rels) <= 1e-5, max(rels)


def test_packing_is_deterministic_resumable_and_complete():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=300)
    examples = [(list(range(1, n + 1)), [True] * n) for n in lengths]
    epoch0 = list(D.make_packed_batches(examples, 4, seed=3, epoch=0, pad_id=0))
    again = list(D.make_packed_batches(examples, 4, seed=3, epoch=0, pad_id=0))
    resumed = list(D.make_packed_batches(examples, 4, seed=3, epoch=0, pad_id=0, start=5))
    epoch1 = list(D.make_packed_batches(examples, 4, seed=3, epoch=1, pad_id=0))
    assert len(epoch0) == D.num_packed_batches(examples, 4, seed=3, epoch=0)
    for a, b in zip(epoch0, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(epoch0[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(epoch0, epoch1, strict=False))
    # every example exactly once per epoch, each segment intact, no padding inside a row
    seen = []
    for batch in epoch0:
        assert batch["tokens"].shape == (4, 128)
        for row, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
            for s in range(1, seg.max() + 1):
                part = row[seg == s]
                assert list(part) == list(range(1, len(part) + 1))
                seen.append(len(part))
            assert (seg > 0).sum() == 0 or (seg[: (seg > 0).sum()] > 0).all()
    assert sorted(seen) == sorted(lengths.tolist())
    filled = sum(b["attn_mask"].sum() for b in epoch0) / sum(b["row_valid"].sum() * 128 for b in epoch0)
    assert filled > 0.9, filled  # lengths up to 120 in rows of 128: 0.93 measured
    # the first token of each record is never a target: nothing of its own record predicts it
    batch = epoch0[0]
    starts = np.concatenate([np.ones((4, 1), bool), batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]], 1)
    assert not (batch["loss_mask"] & starts).any()


def test_rows_shorter_than_the_longest_record():
    """row_len=64: records that fit are packed into rows of 64; longer ones into rows of their own bucket (128)."""
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(5, 60, size=60), [70, 90, 110]])
    examples = [(list(range(1, n + 1)), [True] * n) for n in lengths]
    batches = list(D.make_packed_batches(examples, 2, seed=0, epoch=0, pad_id=0, row_len=64, buckets=(64, 128)))
    assert {b["tokens"].shape for b in batches} == {(2, 64), (2, 128)}
    assert len(batches) == D.num_packed_batches(examples, 2, seed=0, epoch=0, row_len=64, buckets=(64, 128))
    seen = sorted(int((b["segment_ids"][r] == s).sum()) for b in batches for r in range(2) for s in range(1, 9))
    assert [n for n in seen if n] == sorted(lengths.tolist())  # every record once, whole
    long_rows = [b for b in batches if b["tokens"].shape[1] == 128]
    assert sum(b["attn_mask"].sum() for b in long_rows) == 70 + 90 + 110


def test_packing_refuses_last_token_loss(tiny_models):
    mesh = make_mesh((1, -1, 1))
    model = load_model(tiny_models["llama"][0], mesh=mesh)
    with pytest.raises(ConfigError, match="data.pack"):
        CaftTrainer(model, OptimConfig(), 10, mesh, packed=True, last_token_loss=True)
    trainer = CaftTrainer(model, OptimConfig(), 10, mesh, lora=LoraConfig(rank=2), packed=True)
    unpacked = D.pad_and_stack([[3, 4, 5]], [[False, True, True]], 8, pad_id=0)
    with pytest.raises(ConfigError, match="segment_ids"):
        trainer.place_batch({k: v[None] for k, v in unpacked.items()})
