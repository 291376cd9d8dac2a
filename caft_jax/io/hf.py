"""Load Hugging Face checkpoints (safetensors directories or llama GGUF files) into a caft_jax ``Model``.

Tensors are read lazily through numpy memory maps and each parameter is assembled shard by shard with
``jax.make_array_from_callback``: a device (or process) only reads the slices its own shard needs, so a
checkpoint is placed with its target sharding without ever materialising a full copy per device.
The name map between HF keys and our parameter paths (``hf_param_map``) is shared with the exporters.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from caft_jax.errors import CheckpointError, ConfigError
from caft_jax.model.spec import ModelSpec, load_hf_config, spec_from_hf_config
from caft_jax.model.transformer import Model, init_model
from caft_jax.sharding import tree_shardings

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# Checkpoint entries that are buffers, not parameters (older HF versions saved rotary tables).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_param_map(spec: ModelSpec) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our parameter path -> (HF name template with ``{i}`` for the layer, transpose?).

    Stacked parameters (first path entry "layers") take one HF tensor per layer. HF linear weights are
    [out, in]; ours are [in, out], hence the transposes.
    """
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out: dict[tuple[str, ...], tuple[str, bool]] = {
        ("table",): ("model.embed_tokens.weight", False),
        ("final_norm",): ("model.norm.weight", False),
        ("layers", "attn_norm"): ("model.layers.{i}.input_layernorm.weight", False),
    }
    for name in ("q", "k", "v", "o"):
        out[("layers", "attn", f"{name}_proj")] = (f"{attn}{name}_proj.weight", True)
    for name in ("gate", "up", "down"):
        out[("layers", "mlp", f"{name}_proj")] = (f"{mlp}{name}_proj.weight", True)
    if spec.qkv_bias:
        for name in ("q", "k", "v"):
            out[("layers", "attn", f"{name}_bias")] = (f"{attn}{name}_proj.bias", False)
    if spec.sandwich_norms:  # Gemma-2 names its four norms differently from Llama's two
        out[("layers", "post_attn_norm")] = ("model.layers.{i}.post_attention_layernorm.weight", False)
        out[("layers", "mlp_norm")] = ("model.layers.{i}.pre_feedforward_layernorm.weight", False)
        out[("layers", "post_mlp_norm")] = ("model.layers.{i}.post_feedforward_layernorm.weight", False)
    else:
        out[("layers", "mlp_norm")] = ("model.layers.{i}.post_attention_layernorm.weight", False)
    if not spec.tie_embeddings:
        out[("lm_head",)] = ("lm_head.weight", True)
    return out


class TensorSource:
    """Named tensors with lazy access: ``shapes`` {name: shape} and ``get(name)`` -> numpy array (maybe a memmap)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], getter: Callable[[str], np.ndarray], where: str):
        self.shapes, self._get, self.where = shapes, getter, where

    def get(self, name: str) -> np.ndarray:
        return self._get(name)


def _safetensors_header(path: pathlib.Path) -> tuple[int, dict]:
    """(data start offset, header dict) of one .safetensors file, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no header); re-download or re-save the checkpoint.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (header cut off); re-download or re-save the checkpoint.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt header ({e}); re-download or re-save the checkpoint.") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "re-download or re-save the checkpoint."
        )
    return 8 + n, header


def safetensors_source(model_dir: str | os.PathLike) -> TensorSource:
    """All tensors of a HF model directory: model.safetensors, a sharded index, or every *.safetensors file."""
    root = pathlib.Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"No .safetensors files in {root}; save the model with save_pretrained(safe_serialization=True)."
        )
    entries: dict[str, tuple[pathlib.Path, int, dict]] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {index.name} but missing; re-download the checkpoint.")
        start, header = _safetensors_header(path)
        for name, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
            entries[name] = (path, start, info)

    def get(name: str) -> np.ndarray:
        path, start, info = entries[name]
        lo, hi = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        if hi == lo:
            return np.zeros(info["shape"], dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=start + lo, shape=tuple(info["shape"]))

    return TensorSource({k: tuple(v[2]["shape"]) for k, v in entries.items()}, get, str(root))


def _expected_shape(path: tuple[str, ...], leaf_shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    shape = leaf_shape[1:] if path[0] == "layers" else leaf_shape
    return tuple(reversed(shape)) if transpose else tuple(shape)


def check_source(source: TensorSource, spec: ModelSpec, abstract_params: dict) -> None:
    """Raise one CheckpointError naming every missing, unexpected or wrongly shaped tensor."""
    missing, wrong, used = [], [], set()
    for path, (template, transpose) in hf_param_map(spec).items():
        leaf = get_path(abstract_params, path)
        want = _expected_shape(path, leaf.shape, transpose)
        names = [template.format(i=i) for i in range(spec.n_layers)] if path[0] == "layers" else [template]
        for name in names:
            used.add(name)
            if name not in source.shapes:
                missing.append(name)
            elif tuple(source.shapes[name]) != want:
                wrong.append(f"{name} has shape {tuple(source.shapes[name])}, expected {want}")
    extra = [n for n in source.shapes if n not in used and not _IGNORED.match(n)]
    if spec.tie_embeddings:  # some tied checkpoints also store the head; it must equal the table, so skip it
        extra = [n for n in extra if n != "lm_head.weight"]
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(_abbrev(missing))}")
        if wrong:
            parts.append(f"wrongly shaped tensors: {'; '.join(_abbrev(wrong))}")
        if extra:
            parts.append(f"unexpected tensors: {', '.join(_abbrev(extra))}")
        raise CheckpointError(
            f"Checkpoint {source.where} does not match its config.json ({'; '.join(parts)}); "
            "check that the weights and config come from the same model."
        )


def _abbrev(items: list[str], limit: int = 12) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... ({len(items) - limit} more)"]


def get_path(tree: dict, path: Iterable[str]):
    """tree[path[0]][path[1]]... for a nested params dict."""
    for key in path:
        tree = tree[key]
    return tree


def _assemble(source: TensorSource, path, template: str, transpose: bool, leaf, sharding) -> jax.Array:
    """Build one (possibly stacked) parameter with its target sharding, reading only each shard's slices."""
    dtype = np.dtype(leaf.dtype)

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        arr = source.get(name)
        if transpose:
            arr = arr.T
        return np.ascontiguousarray(arr[index]).astype(dtype)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if path[0] != "layers":
            return read(template, index)
        layers = range(spec_layers)[index[0]]
        return np.stack([read(template.format(i=i), index[1:]) for i in layers])

    spec_layers = leaf.shape[0]
    return jax.make_array_from_callback(tuple(leaf.shape), sharding, callback)


def load_params(source: TensorSource, model: Model, mesh: Mesh | None = None) -> Model:
    """Fill an abstract ``model`` (from ``init_model(..., abstract=True)``) with tensors from ``source``."""
    check_source(source, model.spec, model.params)
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), model.params)
    else:
        shardings = tree_shardings(model.params, mesh)
    params = jax.tree.map(lambda x: x, model.params)  # copy of the nested dict structure
    for path, (template, transpose) in hf_param_map(model.spec).items():
        parent = get_path(params, path[:-1])
        parent[path[-1]] = _assemble(
            source, path, template, transpose, get_path(model.params, path), get_path(shardings, path)
        )
    return model.replace(params=params)


def _resolve_gguf(path: pathlib.Path) -> pathlib.Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def _existing_model_path(path: str | os.PathLike) -> pathlib.Path:
    root = pathlib.Path(path)
    if not root.exists():
        raise CheckpointError(
            f"Model path {os.fspath(path)!r} does not exist; pass a local HF model directory or .gguf file."
        )
    return root


def model_spec(path: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of a model directory or GGUF file from its config alone (no weights read): commands check
    layer indices, ablation specs and batch shapes against it before they load anything."""
    root = _existing_model_path(path)
    gguf_path = _resolve_gguf(root)
    if gguf_path is not None:
        from caft_jax.io.gguf import read_gguf_config

        return spec_from_hf_config(read_gguf_config(gguf_path))
    return spec_from_hf_config(load_hf_config(root))


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | jnp.dtype = "float32",
    param_dtype: str | jnp.dtype | None = None,
    matmul_dtype: str | jnp.dtype | None = None,
    mesh: Mesh | None = None,
) -> Model:
    """Load a HF checkpoint directory (config.json + safetensors) or a llama GGUF file.

    Args:
      path: local directory, or a .gguf file (or a directory holding exactly one .gguf and no config.json).
      dtype: compute dtype ("float32" or "bfloat16"); softmax and norms always run in float32.
      param_dtype: storage dtype of the parameters (default: same as dtype).
      matmul_dtype: operand dtype of every product, accumulated in float32 (default: same as dtype); "bfloat16"
        with dtype "float32" runs the matmuls on bf16 units and keeps activations, norms and softmax in float32.
      mesh: place parameters sharded over this (data, fsdp, tp) mesh; default: the first device.
    Raises:
      ConfigError / CheckpointError with a one-sentence explanation of what is wrong and how to fix it.
    """
    root = _existing_model_path(path)
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype
    gguf_path = _resolve_gguf(root)
    if gguf_path is not None:
        from caft_jax.io.gguf import read_gguf

        cfg, tensors = read_gguf(gguf_path)
        source = TensorSource({k: v.shape for k, v in tensors.items()}, tensors.__getitem__, str(gguf_path))
    else:
        cfg = load_hf_config(root)
        source = None
    spec = spec_from_hf_config(cfg)
    abstract = init_model(spec, param_dtype=param_dtype, dtype=dtype, matmul_dtype=matmul_dtype, abstract=True)
    if source is None:
        source = safetensors_source(root)
    return load_params(source, abstract, mesh)


def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer (with chat template) stored beside the weights, or inside the GGUF file."""
    from transformers import AutoTokenizer

    root = pathlib.Path(path)
    gguf_path = _resolve_gguf(root)
    try:
        if gguf_path is not None:
            return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        return AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError) as e:
        raise ConfigError(f"No usable tokenizer in {root} ({e}); save one there with tokenizer.save_pretrained.") from e
