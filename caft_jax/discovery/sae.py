"""Sparse autoencoders for direction discovery: the SAE pytree, encoding/decoding and loading both file formats.

Two SAE families, encoded exactly as caft_method.md sections 2.3 and 2.4 state:

* dictionary_learning BatchTopK (``ae.pt`` + ``config.json``, e.g. adamkarvonen/qwen_coder_32b_saes), inference with
  the learned global threshold: ``a = ReLU((x - b_dec) W_enc + b_enc)``, ``f = a * [a > threshold]``;
* Gemma Scope JumpReLU (``params.npz``, e.g. google/gemma-scope-2b-pt-res), no b_dec subtraction:
  ``pre = x W_enc + b_enc``, ``f = ReLU(pre) * [pre > threshold]`` (threshold per latent).

Both decode as ``f W_dec + b_dec``. Shapes: W_enc [d, d_sae], b_enc [d_sae], W_dec [d_sae, d] (rows are the latent
directions), b_dec [d], threshold [] (BatchTopK) or [d_sae] (JumpReLU).

``ae.pt`` is read without PyTorch by a restricted unpickler of torch's zip format (only tensors, storages and ordered
dicts are accepted, like ``torch.load(weights_only=True)``); if that reader cannot parse a file and torch is
installed, ``torch.load(weights_only=True)`` is used instead.

Scoring and ranking latents (gradient attribution, activation-difference sums) is in ``latent_scores``.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import zipfile

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.errors import CheckpointError, ConfigError

KINDS = ("batchtopk", "jumprelu")
HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------------------
# The SAE pytree
# ---------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SAE:
    """A sparse autoencoder as a pytree of float32 arrays (see the module docstring for shapes and conventions).

    Attributes:
      W_enc [d, d_sae], b_enc [d_sae], W_dec [d_sae, d], b_dec [d], threshold [] or [d_sae].
      kind: "batchtopk" (threshold on the post-ReLU value, b_dec subtracted) or "jumprelu" (threshold on the
        pre-activation, no b_dec subtraction). Static.
      k: BatchTopK's training k (informational; inference uses the threshold), or 0.
    """

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    threshold: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="jumprelu")
    k: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: jax.Array) -> jax.Array:
        """Latent activations f [..., d_sae] of activations x [..., d] (float32)."""
        x = jnp.asarray(x, jnp.float32)
        if self.kind == "batchtopk":
            post = jax.nn.relu(jnp.matmul(x - self.b_dec, self.W_enc, precision=HIGHEST) + self.b_enc)
            return post * (post > self.threshold)
        pre = jnp.matmul(x, self.W_enc, precision=HIGHEST) + self.b_enc
        return jax.nn.relu(pre) * (pre > self.threshold)

    def decode(self, f: jax.Array) -> jax.Array:
        """Reconstruction [..., d] of latent activations f [..., d_sae]."""
        return jnp.matmul(jnp.asarray(f, jnp.float32), self.W_dec, precision=HIGHEST) + self.b_dec

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def make_sae(W_enc, b_enc, W_dec, b_dec, threshold, *, kind: str, k: int = 0, source: str = "SAE") -> SAE:
    """Build an SAE from numpy arrays after checking that their shapes agree (CheckpointError naming ``source``)."""
    if kind not in KINDS:
        raise ConfigError(f"SAE kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    arrays = [np.asarray(a, np.float32) for a in (W_enc, b_enc, W_dec, b_dec, threshold)]
    W_enc, b_enc, W_dec, b_dec, threshold = arrays
    if W_enc.ndim != 2:
        raise CheckpointError(f"{source}: the encoder weight has shape {W_enc.shape}; expected a matrix [d, d_sae].")
    d, d_sae = W_enc.shape
    want = {
        "b_enc": (b_enc, [(d_sae,)]),
        "W_dec": (W_dec, [(d_sae, d)]),
        "b_dec": (b_dec, [(d,)]),
        "threshold": (threshold, [(), (1,), (d_sae,)] if kind == "batchtopk" else [(d_sae,), (), (1,)]),
    }
    for name, (arr, shapes) in want.items():
        if arr.shape not in shapes:
            raise CheckpointError(
                f"{source}: {name} has shape {arr.shape}, expected {shapes[0]} for an SAE of width {d_sae} on d={d}."
            )
    if threshold.shape == (1,):
        threshold = threshold.reshape(())
    return SAE(
        W_enc=jnp.asarray(W_enc),
        b_enc=jnp.asarray(b_enc),
        W_dec=jnp.asarray(W_dec),
        b_dec=jnp.asarray(b_dec),
        threshold=jnp.asarray(threshold),
        kind=kind,
        k=int(k),
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading torch.save files without torch
# ---------------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        dtype = _STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """numpy equivalent of torch._utils._rebuild_tensor_v2 (strides in elements)."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, *_):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl into numpy arrays, refusing every other global."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        dtype = pid[1].dtype.newbyteorder("<" if self.byteorder == "little" else ">")
        raw = self.archive.read(f"{self.prefix}data/{pid[2]}")
        return np.frombuffer(raw, dtype=dtype).astype(pid[1].dtype)


def _read_torch_zip(path: pathlib.Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("not a torch zip checkpoint (no single data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        with archive.open(pkl[0]) as f:
            return _TorchUnpickler(f, archive, prefix, byteorder).load()


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``torch.save``d state dict as numpy arrays ({name: array}), with or without torch installed."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a dictionary_learning SAE directory holding ae.pt.")
    try:
        state = _read_torch_zip(path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, EOFError) as own_error:
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path} could not be read without PyTorch ({own_error}); install torch to load it."
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is a bad file for the user
            raise CheckpointError(f"{path} is not a readable PyTorch state dict ({e}); re-download it.") from e
        state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict; save sae.state_dict().")
    return {str(k): np.asarray(v) for k, v in state.items()}


class _TorchGlobal:
    """A ``module.name`` reference pickled as a GLOBAL opcode, so torch's names are written without importing torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists that the reduce function is callable
        raise TypeError(f"{self.module}.{self.name} is only a pickled reference")


class _TorchTensor:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array

    def __reduce__(self):
        strides = tuple(s // self.array.itemsize for s in self.array.strides)
        storage = _TorchStorage(self.key, self.array)
        args = (storage, 0, self.array.shape, strides, False, collections.OrderedDict())
        return _TorchGlobal("torch._utils", "_rebuild_tensor_v2"), args


class _TorchStorage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _TorchPickler(pickle._Pickler):  # the Python pickler: its ``save`` can be extended, the C one's cannot
    def persistent_id(self, obj):
        if isinstance(obj, _TorchStorage):
            storage = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int32): "IntStorage"}[obj.array.dtype]
            return ("storage", _TorchGlobal("torch", storage), obj.key, "cpu", obj.array.size)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _TorchGlobal):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def write_torch_state_dict(path: str | os.PathLike, state: dict[str, np.ndarray]) -> None:
    """Write {name: float32 or int32 array} in torch.save's zip format (read by ``torch.load(weights_only=True)``
    and by ``read_torch_state_dict``) without PyTorch: the package saves dictionary_learning SAEs torch-free."""
    path = pathlib.Path(path)
    arrays = {}
    for name, value in state.items():
        value = np.asarray(value)
        dtype = np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32  # dictionary_learning's k: int32
        arrays[name] = np.array(value, dtype=dtype, order="C")  # ascontiguousarray would make a scalar [1]
    tensors = {name: _TorchTensor(str(i), a) for i, (name, a) in enumerate(arrays.items())}
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    prefix = path.stem or "archive"
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        archive.writestr(f"{prefix}/byteorder", "little")
        for tensor in tensors.values():
            archive.writestr(
                f"{prefix}/data/{tensor.key}", tensor.array.astype("<" + tensor.array.dtype.str[1:]).tobytes()
            )
        archive.writestr(f"{prefix}/version", "3\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def load_batchtopk_sae(directory: str | os.PathLike) -> SAE:
    """Load a dictionary_learning BatchTopK SAE from a directory with ``ae.pt`` (and, if present, ``config.json``).

    State-dict keys: encoder.weight [d_sae, d], encoder.bias [d_sae], decoder.weight [d, d_sae], b_dec [d],
    threshold [] (must have been set by training, i.e. >= 0), k []. ``config.json``'s trainer.activation_dim,
    dict_size and k, when present, are checked against the weights.
    """
    root = pathlib.Path(directory)
    ae = root / "ae.pt" if root.is_dir() else root
    state = read_torch_state_dict(ae)
    needed = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "threshold")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{ae} lacks {', '.join(missing)}; it is not a dictionary_learning BatchTopK SAE.")
    threshold = np.asarray(state["threshold"], np.float32)
    if threshold.size == 1 and float(threshold.reshape(())) < 0:
        raise CheckpointError(f"{ae} has no learned threshold (threshold < 0), so it cannot encode single tokens.")
    k = int(np.asarray(state.get("k", 0)).reshape(()))
    sae = make_sae(
        state["encoder.weight"].T,
        state["encoder.bias"],
        state["decoder.weight"].T,
        state["b_dec"],
        threshold,
        kind="batchtopk",
        k=k,
        source=str(ae),
    )
    config_path = ae.parent / "config.json"
    if config_path.is_file():
        try:
            trainer = json.loads(config_path.read_text()).get("trainer", {})
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e}); re-download it.") from e
        for key, value in (("activation_dim", sae.d_model), ("dict_size", sae.d_sae), ("k", k if k else None)):
            if key in trainer and value is not None and int(trainer[key]) != value:
                raise CheckpointError(f"{config_path} says {key}={trainer[key]} but {ae} has {value}; re-download.")
    return sae


def load_jumprelu_sae(path: str | os.PathLike) -> SAE:
    """Load a Gemma Scope JumpReLU SAE from ``params.npz`` (or a directory holding it).

    Arrays: W_enc [d, d_sae], b_enc [d_sae], W_dec [d_sae, d], b_dec [d], threshold [d_sae].
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "params.npz"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a Gemma Scope params.npz file.")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file
        raise CheckpointError(f"{path} is not a readable .npz file ({e}); re-download it.") from e
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if k not in arrays]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a Gemma Scope JumpReLU SAE.")
    return make_sae(
        arrays["W_enc"],
        arrays["b_enc"],
        arrays["W_dec"],
        arrays["b_dec"],
        arrays["threshold"],
        kind="jumprelu",
        source=str(path),
    )


def load_sae(path: str | os.PathLike) -> SAE:
    """Load either format: a directory with ``ae.pt`` (BatchTopK), or ``params.npz`` / a directory holding it."""
    path = pathlib.Path(path)
    if (path.is_dir() and (path / "ae.pt").is_file()) or path.suffix == ".pt":
        return load_batchtopk_sae(path)
    if (path.is_dir() and (path / "params.npz").is_file()) or path.suffix == ".npz":
        return load_jumprelu_sae(path)
    raise CheckpointError(f"{path} holds neither ae.pt (dictionary_learning) nor params.npz (Gemma Scope).")
