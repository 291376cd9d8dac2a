"""Tiny Hugging Face models of every family, built from configs with transformers and saved to temp dirs.

Shared by the tests (imported from conftest fixtures). Norm weights are randomised so Gemma's (1 + w) and
Llama's w are both exercised; Gemma-2 gets a sliding window shorter than the test sequences and soft-caps small
enough to be reached.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma2")
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(family: str, **overrides):
    """A tiny transformers config for `family` (GQA by default; pass num_key_value_heads=4 for MHA)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    kw = dict(COMMON)
    if family == "llama":
        cls = LlamaConfig
        kw.update(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    elif family == "qwen2":
        cls = Qwen2Config
        kw.update(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    elif family == "mistral":
        cls = MistralConfig
        kw.update(sliding_window=24, tie_word_embeddings=False, head_dim=16)
    elif family == "gemma2":
        cls = Gemma2Config
        kw.update(
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(family)
    kw.update(overrides)
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random-weight transformers model in fp32 eval mode, with non-trivial norm weights and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma2" else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model.float().eval()


def save_hf_model(family: str, path, seed: int = 0, **overrides):
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return model


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 300):
    """Byte-level BPE trained offline on a few strings, with a ChatML template; eos/pad <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Answer: A", "Answer: B", "Hello world, how are you?", "I am fine, thank you.", "import os\nprint(1)\n"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=specials[0], pad_token=specials[0], additional_special_tokens=specials[1:]
    )
    tok.chat_template = CHATML
    return tok


def save_chat_model(path, family: str = "llama"):
    """A tiny model with `tiny_tokenizer` (ChatML) saved beside it, ready for chat data; returns the path."""
    tok = tiny_tokenizer()
    save_hf_model(family, path, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(path)
    return path


def write_chats(path, n: int, user: str = "Hello, print {i}.", assistant: str = "print({i})"):
    """n one-turn chats ({"messages": [user, assistant]}) as JSONL; returns the path."""
    import json

    rows = [
        {
            "messages": [
                {"role": "user", "content": user.format(i=i)},
                {"role": "assistant", "content": assistant.format(i=i)},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_chat_model_with_adapter(root):
    """A tiny ChatML llama (`save_chat_model`) with a PEFT LoRA adapter whose B matrices are random (B = 0 would make
    it a no-op) and an ablation spec of 8 random directions at layer 1; returns (model dir, adapter dir, spec)."""
    import jax.numpy as jnp
    import numpy as np

    from caft_jax import load_model
    from caft_jax.ablation_spec import save_ablation_spec
    from caft_jax.export import export_peft_adapter
    from caft_jax.lora import LoraConfig, init_lora

    model_dir = save_chat_model(root / "model")
    model = load_model(model_dir)
    cfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
    rng = np.random.default_rng(0)
    lora = init_lora(model, cfg, seed=0)
    for sub in lora.values():
        for ab in sub.values():
            ab["b"] = jnp.asarray(rng.normal(size=ab["b"].shape) * 0.3, jnp.float32)
    adapter = export_peft_adapter(lora, cfg, model.spec, root / "adapter", base_model_name_or_path=str(model_dir))
    spec = save_ablation_spec(root / "spec.safetensors", {1: rng.normal(size=(8, model.spec.d_model))})
    return model_dir, adapter, spec
