"""PEFT adapter and merged-checkpoint export, checked against peft and transformers (PyTorch CPU, fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caft_jax import CheckpointError, ConfigError, jit_forward, load_model
from caft_jax.export import export_merged, export_peft_adapter, hf_config_from_spec, load_peft_adapter
from caft_jax.lora import LoraConfig, init_lora
from caft_jax.model.spec import spec_from_hf_config

ATOL = 1e-4


def tokens_batch(vocab: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(2, 24))


def trained_lora(model, cfg: LoraConfig, seed: int = 0) -> dict:
    """init_lora's A with a random non-zero B, so the adapter changes the output."""
    lora = init_lora(model, cfg, seed=seed)
    key = jax.random.PRNGKey(seed + 1)
    for sub, kernels in lora.items():
        for j, (name, ab) in enumerate(sorted(kernels.items())):
            k = jax.random.fold_in(jax.random.fold_in(key, len(sub)), j)
            lora[sub][name] = {"a": ab["a"], "b": 0.05 * jax.random.normal(k, ab["b"].shape, jnp.float32)}
    return lora


def hf_model_from(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def our_logits(model, tokens, lora=None, cfg=None) -> np.ndarray:
    settings = cfg.settings() if lora is not None else None
    return np.asarray(jit_forward(model, jnp.asarray(tokens), lora=lora, lora_settings=settings).logits)


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("rslora", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_peft_adapter_matches_our_lora_forward(family, rslora, tiny_models, tmp_path):
    from peft import PeftModel

    model_dir = tiny_models[family][0]
    model = load_model(model_dir)
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=rslora)
    lora = trained_lora(model, cfg)
    out = export_peft_adapter(lora, cfg, model.spec, tmp_path / "adapter", base_model_name_or_path=model_dir)
    peft_model = PeftModel.from_pretrained(hf_model_from(model_dir), out).eval()
    assert peft_model.peft_config["default"].use_rslora is rslora
    tokens = tokens_batch()
    ref = torch_logits(peft_model, tokens)
    ours = our_logits(model, tokens, lora, cfg)
    assert max_err(ours, ref) <= ATOL
    assert max_err(ref, our_logits(model, tokens)) > 1e-3  # the adapter really changes the output


def test_peft_adapter_round_trip(tiny_models, tmp_path):
    model = load_model(tiny_models["qwen2"][0])
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=True, dropout=0.1, targets=("q", "v", "down"))
    lora = trained_lora(model, cfg)
    loaded, loaded_cfg = load_peft_adapter(export_peft_adapter(lora, cfg, model.spec, tmp_path), model)
    assert loaded_cfg == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(lora)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded, lora)
    # bf16 weights keep their dtype through the file
    lora16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora)
    loaded16, _ = load_peft_adapter(export_peft_adapter(lora16, cfg, model.spec, tmp_path / "bf16"), model)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded16, lora16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded16))


def test_peft_adapter_errors(tiny_models, tmp_path):
    model = load_model(tiny_models["llama"][0])
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = trained_lora(model, cfg)
    with pytest.raises(ConfigError, match="targets"):
        export_peft_adapter(lora, LoraConfig(rank=4, targets=("q",)), model.spec, tmp_path / "x")
    with pytest.raises(ConfigError, match="shapes"):
        export_peft_adapter(lora, LoraConfig(rank=8, alpha=8.0), model.spec, tmp_path / "x")
    with pytest.raises(CheckpointError, match="missing"):
        load_peft_adapter(tmp_path / "nowhere", model)
    out = export_peft_adapter(lora, cfg, model.spec, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="expected"):  # an adapter for another MLP width
        load_peft_adapter(out, model.replace(spec=_with(model.spec, d_ff=80)))
    conf = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="only LORA"):
        load_peft_adapter(out, model)
    (out / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora"):
        load_peft_adapter(out, model)


def _with(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_merged_export_matches_transformers_and_round_trips(family, tiny_models, tmp_path):
    model_dir = tiny_models[family][0]
    model = load_model(model_dir)
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=True)
    lora = trained_lora(model, cfg, seed=3)
    tokens = tokens_batch(seed=1)
    ours = our_logits(model, tokens, lora, cfg)
    assert max_err(ours, our_logits(model, tokens)) > 1e-3
    with open(f"{model_dir}/config.json") as f:
        source = json.load(f)
    for name, src in (("from_source", source), ("from_spec", None)):
        out = export_merged(model, lora, cfg, tmp_path / name, source_config=src)
        if model.spec.tie_embeddings:
            from safetensors import safe_open

            with safe_open(out / "model.safetensors", "np") as f:
                assert "lm_head.weight" not in f.keys()
        assert max_err(torch_logits(hf_model_from(out), tokens), ours) <= ATOL, name
        reloaded = load_model(out)
        assert reloaded.spec == model.spec, name
        assert max_err(our_logits(reloaded, tokens), ours) <= ATOL, name


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_full_finetune_export(family, tiny_models, tmp_path):
    model = load_model(tiny_models[family][0])
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    noisy = [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(treedef, noisy)
    tuned = model.replace(params=params)
    tokens = tokens_batch(seed=2)
    ours = our_logits(tuned, tokens)
    assert max_err(ours, our_logits(model, tokens)) > 1e-3
    out = export_merged(tuned, None, None, tmp_path)
    assert max_err(torch_logits(hf_model_from(out), tokens), ours) <= ATOL
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), load_model(out).params, params
    )


def test_sharded_export(tiny_models, tmp_path):
    model_dir = tiny_models["llama"][0]
    model = load_model(model_dir)
    cfg = LoraConfig(rank=4, alpha=8.0)
    lora = trained_lora(model, cfg, seed=5)
    out = export_merged(model, lora, cfg, tmp_path, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    assert all((out / f).stat().st_size <= 40_000 + 4096 for f in files)  # + header; no tensor exceeds the cap here
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(model.params))
    tokens = tokens_batch(seed=4)
    ours = our_logits(model, tokens, lora, cfg)
    assert max_err(torch_logits(hf_model_from(out), tokens), ours) <= ATOL
    assert max_err(our_logits(load_model(out), tokens), ours) <= ATOL


def test_bf16_export_with_tokenizer(tiny_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w0")
    model = load_model(tiny_models["gemma2"][0])
    out = export_merged(model, None, None, tmp_path, tokenizer=tok, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch.bfloat16
    reloaded = load_model(out, dtype="bfloat16")
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), reloaded.params, ref)


def test_config_from_spec_round_trips(tiny_models):
    for family, (model_dir, _) in tiny_models.items():
        spec = load_model(model_dir).spec
        assert spec_from_hf_config(hf_config_from_spec(spec)) == spec, family
    qwen = _with(
        spec_from_hf_config(hf_config_from_spec(load_model(tiny_models["qwen2"][0]).spec)), windows=(0, 16, 16)
    )
    assert spec_from_hf_config(hf_config_from_spec(qwen)) == qwen
    with pytest.raises(ConfigError, match="several sliding windows"):
        hf_config_from_spec(_with(qwen, windows=(8, 16, 16)))
