"""Jitted KV-cache generation against uncached forwards and transformers' greedy ``generate``.

Tiny random models of every family check the loop itself (left padding, sliding windows, soft-caps, EOS); the real
SmolLM2-135M-Instruct checks a few chat prompts end to end. Models are loaded once per module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES

from caft_jax import build_projector, empty_projector, jit_forward, load_model, load_tokenizer
from caft_jax.batching import PROMPT_BUCKETS, left_pad
from caft_jax.decode import generate_tokens
from caft_jax.generate import (
    Row,
    SamplingConfig,
    _new_cache,
    generate,
    generate_ids,
    generate_rows,
)

EOS = 2  # the tiny models' eos_token_id
PROMPTS = [[5, 17, 99, 3, 64, 23, 8, 41, 77, 12, 30], [9, 45, 101, 6, 58]]  # two lengths: the second is left-padded
NEW = 16  # 11 + 16 tokens: past Gemma's (8) and Mistral's (24) sliding windows
SMOL_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."]
SMOL_NEW = 20


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """{family: (our model, transformers model)}."""
    return {family: (load_model(path), hf) for family, (path, hf) in tiny_models.items()}


def greedy(**kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=kw.pop("max_new_tokens", NEW), greedy=True, **kw)


def hf_greedy(hf_model, prompts: list[list[int]], new: int, eos: int, pad: int = 0) -> list[list[int]]:
    """transformers' greedy continuation of a left-padded batch, cut after the first EOS of each row."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend with the other processes on a busy CPU
    try:
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=pad, eos_token_id=eos
            )
    finally:
        torch.set_num_threads(threads)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def uncached_logits(model, prompts: list[list[int]], generated: list[list[int]]) -> list[np.ndarray]:
    """Logits each generated token was chosen from, by one plain forward over the left-padded full sequences."""
    seqs = [p + g for p, g in zip(prompts, generated, strict=True)]
    tokens, mask = left_pad(seqs, len(seqs), max(map(len, seqs)), 0)
    full = np.asarray(jit_forward(model, jnp.asarray(tokens), attn_mask=jnp.asarray(mask)).logits)
    width = tokens.shape[1]
    return [full[r, width - len(g) - 1 : width - 1] for r, g in enumerate(generated)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_and_uncached_forward(family, tiny):
    """Left-padded batch of two prompts, past Gemma's (8) and Mistral's (24) sliding windows."""
    model, hf_model = tiny[family]
    out = generate_ids(model, PROMPTS, greedy(), eos_ids=[EOS], pad_id=0, progress=False, record_logits=True)
    ours = [r["token_ids"] for r in out]
    assert ours == hf_greedy(hf_model, PROMPTS, NEW, EOS)
    assert max(map(len, ours)) == NEW  # at least one row ran the full length (the others stopped at EOS)
    for r, ref in zip(out, uncached_logits(model, PROMPTS, ours), strict=True):
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] == EOS else "length")
        err = np.abs(r["logits"] - ref).max()
        assert err <= 1e-4, f"max |cached - uncached| = {err}"
        np.testing.assert_array_equal(r["logits"].argmax(-1), r["token_ids"])


def test_top_p_and_temperature_sampling(tiny):
    model = tiny["llama"][0]

    def run(cfg, prompts=PROMPTS * 2):
        return [r["token_ids"] for r in generate(model, None, prompts, cfg, batch_size=2, progress=False)]

    base = run(greedy())
    assert run(SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=3)) == base  # nucleus of one
    hot = dict(max_new_tokens=NEW, temperature=1.5)
    a, b, c = run(SamplingConfig(**hot, seed=1)), run(SamplingConfig(**hot, seed=1)), run(SamplingConfig(**hot, seed=2))
    assert a == b and a != c and a != base
    assert a[0] != a[2]  # the same prompt twice draws different samples (per-prompt keys)
    nucleus = run(SamplingConfig(**hot, top_p=0.5, seed=1))
    assert nucleus != a and nucleus == run(SamplingConfig(**hot, top_p=0.5, seed=1))
    # A prompt's sample depends on the seed and its index only, not on which prompts share its batch.
    assert run(SamplingConfig(**hot, seed=1), PROMPTS) == a[:2]


def test_bad_settings_are_clear_errors(tiny):
    from caft_jax.errors import CaftError

    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(max_new_tokens=0)):
        with pytest.raises(CaftError):
            SamplingConfig(**bad)
    with pytest.raises(CaftError, match="no tokens"):
        generate(tiny["llama"][0], None, [[5], []], greedy(), progress=False)
    with pytest.raises(CaftError, match="need a tokenizer"):
        generate(tiny["llama"][0], None, ["text"], greedy(), progress=False)


def test_chat_rendering_with_system_message():
    from hf_models import tiny_tokenizer

    from caft_jax.chat import render_prompt as render_chat
    from caft_jax.generate import encode_prompts

    tok = tiny_tokenizer()
    text = render_chat(tok, "Hello", "Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompts(tok, ["Hello"], chat=True, system="Be brief.") == [
        tok(text, add_special_tokens=False)["input_ids"]
    ]
    # a template without a system role (as Gemma's): the system text goes in front of the user message
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<model>"
    )
    assert render_chat(tok, "Hello", "Be brief.") == "<user>Be brief.\n\nHello<model>"


def test_eos_stops_a_row_and_pads_after(tiny):
    model = tiny["llama"][0]
    free = [r["token_ids"] for r in generate(model, None, PROMPTS, greedy(), eos_token_ids=[], progress=False)]
    k = max(j for j in range(4) if free[0][j] not in free[0][:j])  # row 0's first occurrence of some token
    stop = free[0][k]
    first = free[1].index(stop) if stop in free[1] else NEW
    pad = 0
    tokens, mask = left_pad(PROMPTS, 2, PROMPT_BUCKETS.length_for(11), pad)
    out = generate_tokens(
        model, jnp.asarray(tokens), jnp.asarray(mask), jnp.ones(2, bool), jax.random.split(jax.random.key(0), 2),
        _new_cache(model, 2, 16 + NEW), jnp.asarray([stop], jnp.int32), jnp.int32(pad), jnp.ones(2),
        jnp.ones(2), jnp.ones(2, bool), jnp.full(2, NEW, jnp.int32), max_new_tokens=NEW,
    )  # fmt: skip
    out = jax.device_get({key: v for key, v in out.items() if key != "cache"})
    assert list(out["tokens"][0, : k + 1]) == free[0][: k + 1] and out["lengths"][0] == k + 1 and out["stopped"][0]
    assert (out["tokens"][0, k + 1 :] == pad).all()  # pad after the EOS
    assert out["lengths"][1] == min(first + 1, NEW) and out["stopped"][1] == (first < NEW)
    results = generate(model, None, PROMPTS, greedy(), eos_token_ids=[stop], progress=False)
    assert results[0]["token_ids"] == free[0][: k + 1] and results[0]["finish_reason"] == "stop"


def test_projector_at_generation_time_and_bounded_compiles(tiny):
    model = tiny["llama"][0]
    spec = model.spec
    plain = generate(model, None, PROMPTS, greedy(), eos_token_ids=[], progress=False)
    empty = empty_projector(spec.n_layers, spec.d_model, k_max=4)
    assert generate(model, None, PROMPTS, greedy(), eos_token_ids=[], projector=empty, progress=False) == plain
    rng = np.random.default_rng(0)
    ablated = build_projector({1: rng.normal(size=(4, spec.d_model))}, spec.n_layers, spec.d_model, k_max=4)
    before = generate_tokens._cache_size()
    changed = generate(model, None, PROMPTS, greedy(), eos_token_ids=[], projector=ablated, progress=False)
    assert [r["token_ids"] for r in changed] != [r["token_ids"] for r in plain]
    # New directions, sampling instead of greedy, two batches of other prompt lengths in the same bucket: no compile.
    other = build_projector({0: rng.normal(size=(2, spec.d_model))}, spec.n_layers, spec.d_model, k_max=4)
    prompts = [[7] * 3, [8] * 9, [9] * 14, [10] * 6]
    cfg = SamplingConfig(max_new_tokens=NEW, top_p=0.9)
    generate(model, None, prompts, cfg, eos_token_ids=[], projector=other, batch_size=2, progress=False)
    assert generate_tokens._cache_size() == before


def test_streamed_rows_equal_one_program_and_mixed_settings_share_a_batch(tiny):
    """Per-row settings in one batch, each row as if alone; streaming (decode 3 steps per call) gives the same
    tokens and logprobs, delivered in order."""
    model = tiny["llama"][0]
    rows = [
        Row(PROMPTS[0], SamplingConfig(max_new_tokens=NEW, greedy=True)),
        Row(PROMPTS[1], SamplingConfig(max_new_tokens=5, temperature=1.3, seed=4), stream=7),
        Row(PROMPTS[1], SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.6, seed=2), stream=1),
    ]
    kw = dict(eos_ids=[], pad_id=0, progress=False, top_logprobs=3, batch_size=4)
    together = generate_rows(model, rows, **kw)
    for row, result in zip(rows, together, strict=True):
        (alone,) = generate_rows(model, [row], **kw)
        assert alone["token_ids"] == result["token_ids"] and len(alone["token_ids"]) == row.sampling.max_new_tokens
        np.testing.assert_array_equal(alone["top_ids"], result["top_ids"])
    pieces = {0: [], 1: [], 2: []}
    streamed = generate_rows(model, rows, **kw, on_tokens=lambda i, p: pieces[i].append(p), stream_every=3)
    for i, (a, b) in enumerate(zip(together, streamed, strict=True)):
        assert a["token_ids"] == b["token_ids"] == [t for p in pieces[i] for t in p["token_ids"]]
        np.testing.assert_array_equal(a["logprobs"], np.concatenate([p["logprobs"] for p in pieces[i]]))
        assert max(len(p["token_ids"]) for p in pieces[i]) <= 3


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: real chat prompts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load_model(smollm2_path), load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def smol_hf(smol, tmp_path_factory):
    """transformers' model with the same weights, via our HF export: ~3 s instead of ~20 s for transformers' GGUF
    de-quantisation. (tests/test_smollm2.py checks our GGUF loader against transformers' own.)"""
    from transformers import AutoModelForCausalLM

    from caft_jax.export import export_merged

    path = export_merged(smol[0], None, None, tmp_path_factory.mktemp("smollm2_hf"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_greedy_matches_transformers_smollm2_chat(smol, smol_hf):
    model, tokenizer = smol
    ours = generate(model, tokenizer, SMOL_PROMPTS, greedy(max_new_tokens=SMOL_NEW), chat=True, progress=False)
    chats = [[{"role": "user", "content": p}] for p in SMOL_PROMPTS]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tokenizer.eos_token_id
    assert smol_hf.generation_config.eos_token_id in (eos, [eos])
    ref = hf_greedy(smol_hf, prompts, SMOL_NEW, eos, pad=tokenizer.pad_token_id)
    assert [r["token_ids"] for r in ours] == ref
    for r in ours:
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] == eos else "length")
        assert r["text"] == tokenizer.decode([t for t in r["token_ids"] if t != eos], skip_special_tokens=True)
    assert [r["finish_reason"] for r in ours] == ["stop", "length", "stop"]  # both ways of ending are covered
    assert "Paris" in ours[0]["text"]
