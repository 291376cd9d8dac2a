"""Sparse autoencoders for direction discovery: loading, encoding, attribution and latent rankings.

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
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import pickle
import zipfile
from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.discovery.capture import SITES, first_token_mask
from caft_jax.errors import CheckpointError, ConfigError, DataError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Capture, Model, forward
from caft_jax.projector import Projector

KINDS = ("batchtopk", "jumprelu")
METRICS = ("ce", "logit_diff")
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


# ---------------------------------------------------------------------------------------------------------------
# Attribution
# ---------------------------------------------------------------------------------------------------------------


def _metric_value(logits, batch, metric: str) -> jax.Array:
    """Scalar metric of one batch from logits [b, t, V] (see ``sae_attribution``)."""
    valid = batch["row_valid"]
    if metric == "ce":
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        targets = batch["tokens"][:, 1:]
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"][:, 1:] & valid[:, None]
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    last = logits[:, -1].astype(jnp.float32)
    diff = jnp.take_along_axis(last, batch["target"][:, None], -1) - jnp.take_along_axis(
        last, batch["other"][:, None], -1
    )
    return jnp.sum(jnp.where(valid, diff[:, 0], 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@functools.partial(jax.jit, static_argnames=("lora_settings", "capture", "metric"))
def _attribution_step(model, saes, batch, keep, lora, lora_settings, projector, capture, metric):
    """(metric, per-layer gradient-times-latent effects [d_sae] summed over kept positions) of one batch."""
    b, t = batch["tokens"].shape

    def run(delta):
        out = forward(
            model,
            batch["tokens"],
            attn_mask=batch["attn_mask"],
            lora=lora,
            lora_settings=lora_settings,
            projector=projector,
            capture=capture,
            capture_delta=delta,
        )
        return _metric_value(out.logits, batch, metric), out.captured

    delta0 = jnp.zeros((len(capture.layers), b, t, model.spec.d_model), jnp.float32)
    (value, acts), grads = jax.value_and_grad(run, has_aux=True)(delta0)
    effects = []
    for i, sae in enumerate(saes):
        feats = sae.encode(acts[i]) * keep[..., None]  # [b, t, d_sae]
        along = jnp.matmul(grads[i].astype(jnp.float32), sae.W_dec.T, precision=HIGHEST)  # W_dec[j] . g, [b, t, d_sae]
        effects.append(jnp.einsum("bts,bts->s", feats, along, precision=HIGHEST))
    return value, effects


def attribution_batch(batch: dict, metric: str) -> dict:
    """The device arrays ``sae_attribution`` needs from a batch dict, with clear errors for missing fields."""
    if metric not in METRICS:
        raise ConfigError(f"attribution metric {metric!r} is unknown; use one of {', '.join(METRICS)}.")
    need = ["tokens", "attn_mask"] + (["loss_mask"] if metric == "ce" else ["target", "other"])
    missing = [k for k in need if k not in batch]
    if missing:
        raise DataError(
            f"metric {metric!r} needs batches with {', '.join(missing)}; build them with caft_jax.data"
            + (" and letter_batches." if metric == "logit_diff" else ".")
        )
    b, t = np.shape(batch["tokens"])
    out = {
        "tokens": jnp.asarray(batch["tokens"], jnp.int32),
        "attn_mask": jnp.asarray(batch["attn_mask"], bool),
        "row_valid": jnp.asarray(batch.get("row_valid", np.ones(b, bool)), bool),
        "loss_mask": jnp.asarray(batch.get("loss_mask", np.zeros((b, t), bool)), bool),
        "target": jnp.asarray(batch.get("target", np.zeros(b, np.int32)), jnp.int32),
        "other": jnp.asarray(batch.get("other", np.zeros(b, np.int32)), jnp.int32),
    }
    return out


def attribution_positions(batch: dict, *, exclude_bos: bool = True) -> np.ndarray:
    """Positions summed in the attribution: real tokens of valid rows, minus each row's first token. bool [b, t]."""
    keep = np.asarray(batch["attn_mask"], bool).copy()
    if "row_valid" in batch:
        keep &= np.asarray(batch["row_valid"], bool)[:, None]
    if exclude_bos:
        keep &= ~first_token_mask(batch["attn_mask"])
    return keep


def sae_attribution(
    model: Model,
    sae_by_layer: dict[int, SAE],
    batches: Iterable[dict],
    *,
    metric: str = "ce",
    site: str = "resid_post",
    exclude_bos: bool = True,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Attribution of every SAE latent to a metric (caft_method.md 2.3 item 1 and 2.4).

    For each batch, with x the activation at ``site`` of layer l, g = d metric / d x (the total derivative through
    the rest of the network, as a backward hook on that layer's output gives) and f = SAE_l.encode(x)::

        effect_i = sum over rows and positions p (real tokens, not the first token of a row when exclude_bos)
                   of f_i(x_p) * (W_dec[i] . g_p)

    and the result is the mean of the per-batch effects over batches (the authors' "summed over batches /
    n_batches"; with batch size 1 this is the mean over examples). Positive values are latents whose first-order
    contribution raises the metric.

    Args:
      model: the model whose activations are attributed (the base model in the paper).
      sae_by_layer: {layer: SAE} with d_model matching the model.
      batches: batch dicts. metric "ce" uses ``loss_mask``; "logit_diff" needs ``target`` and ``other`` int [b]
        token ids (see ``letter_batches``) and uses each row's last position (rows are left-padded).
      metric: "ce" = mean next-token cross-entropy over answer tokens (loss_mask) of the batch's valid rows;
        "logit_diff" = mean over valid rows of logit(target) - logit(other) at the last position.
      site: "resid_post" or "resid_mid".
      exclude_bos: leave each row's first real token out of the sum.
      lora, lora_settings, projector: optional adapter / ablation in the forward (dropout off).
      progress: show a progress bar.
    Returns:
      {layer: float64 [d_sae]}.
    """
    if site not in SITES:
        raise ConfigError(f"attribution site {site!r} is unknown; use one of {', '.join(SITES)}.")
    if not sae_by_layer:
        raise ConfigError("sae_by_layer is empty; pass at least one {layer: SAE}.")
    layers = tuple(sorted(int(layer) for layer in sae_by_layer))
    bad = [layer for layer in layers if not 0 <= layer < model.spec.n_layers]
    if bad:
        raise ConfigError(f"SAE layers {bad} are outside the model's {model.spec.n_layers} layers.")
    saes = tuple(sae_by_layer[layer] for layer in layers)
    for layer, sae in zip(layers, saes, strict=True):
        if sae.d_model != model.spec.d_model:
            raise ConfigError(
                f"the layer {layer} SAE reads d={sae.d_model} activations but the model has d_model="
                f"{model.spec.d_model}; use SAEs trained on this model."
            )
    if lora is not None and lora_settings is None:
        raise ConfigError("LoRA weights were given without lora_settings; pass LoraConfig.settings().")
    settings = None if lora_settings is None else LoraSettings(scale=lora_settings.scale, dropout=0.0)
    capture = Capture(layers, site, jnp.float32)
    totals = [np.zeros(sae.d_sae, np.float64) for sae in saes]
    n_batches = 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"attribution ({metric})", unit="batch", dynamic_ncols=True)
    for batch in batches:
        device_batch = attribution_batch(batch, metric)
        keep = jnp.asarray(attribution_positions(batch, exclude_bos=exclude_bos), jnp.float32)
        _, effects = _attribution_step(model, saes, device_batch, keep, lora, settings, projector, capture, metric)
        for total, effect in zip(totals, effects, strict=True):
            total += np.asarray(effect, np.float64)
        n_batches += 1
    if n_batches == 0:
        raise DataError("sae_attribution got no batches; pass a non-empty dataset.")
    return {layer: total / n_batches for layer, total in zip(layers, totals, strict=True)}


def letter_batches(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    others: Sequence[str],
    *,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
) -> list[dict[str, np.ndarray]]:
    """Prompt-only batches for the "logit_diff" metric (the spurious-task setting of caft_method.md 2.4).

    Each prompt is tokenised with the tokenizer's default special tokens (BOS for Gemma) and left-padded; batch dicts
    get ``target`` and ``other`` int32 [b]: the token ids of the intended and the other answer letter (" A" style,
    see ``caft_jax.data.letter_token_id``). Rows filling a final partial batch have row_valid False. File order.
    """
    from caft_jax.data import letter_token_id, make_batches

    if not (len(prompts) == len(targets) == len(others)) or not prompts:
        raise DataError(
            f"letter_batches got {len(prompts)} prompts, {len(targets)} targets and {len(others)} others; "
            "pass one target and one other letter per prompt."
        )
    examples = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        examples.append((ids, [False] * len(ids)))
    target_ids = np.array([letter_token_id(tokenizer, t) for t in targets], np.int32)
    other_ids = np.array([letter_token_id(tokenizer, o) for o in others], np.int32)
    out = []
    batches = make_batches(examples, batch_size, seed=0, epoch=0, pad_id=pad_id, buckets=buckets, shuffle=False)
    for i, batch in enumerate(batches):
        lo, hi = i * batch_size, min((i + 1) * batch_size, len(examples))
        batch["target"] = np.zeros(batch_size, np.int32)
        batch["other"] = np.zeros(batch_size, np.int32)
        batch["target"][: hi - lo] = target_ids[lo:hi]
        batch["other"][: hi - lo] = other_ids[lo:hi]
        out.append(batch)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Activation-difference rankings
# ---------------------------------------------------------------------------------------------------------------

ENCODE_CHUNK = 1024


@jax.jit
def _code_sum(sae: SAE, x: jax.Array, valid: jax.Array) -> jax.Array:
    """sum over valid rows of SAE.encode(x): x [c, d], valid [c] -> [d_sae]."""
    return jnp.sum(sae.encode(x) * valid[:, None], axis=0)


def latent_sums(sae: SAE, X, *, chunk: int = ENCODE_CHUNK) -> np.ndarray:
    """sum over rows of SAE.encode(X) for X [n, d], in fixed-size chunks (one compilation). float64 [d_sae]."""
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[1] != sae.d_model:
        raise DataError(f"expected activations [n, {sae.d_model}] for this SAE, got shape {X.shape}.")
    total = np.zeros(sae.d_sae, np.float64)
    rows = min(chunk, max(len(X), 1))
    for start in range(0, len(X), rows):
        part = X[start : start + rows]
        valid = np.zeros(rows, np.float32)
        valid[: len(part)] = 1.0
        padded = np.zeros((rows, X.shape[1]), np.float32)
        padded[: len(part)] = part
        total += np.asarray(_code_sum(sae, padded, valid), np.float64)
    return total


def _chunks(data) -> Iterable[dict]:
    return [data] if isinstance(data, dict) else data


def mean_latent_diff(sae_by_layer: dict[int, SAE], pairs) -> dict[int, np.ndarray]:
    """sum_tokens SAE.encode(act_ft) - sum_tokens SAE.encode(act_base) per layer (caft_method.md 2.3 item 2).

    Args:
      sae_by_layer: {layer: SAE}.
      pairs: {layer: (act_base [n, d], act_ft [n, d])}, or an iterable of such dicts (e.g. ``iter_pairs``
        output, to stream over batches). Layers without an SAE are ignored.
    Returns:
      {layer: float64 [d_sae]}; rank with ``rank_latents(..., positive_only=True)`` as the authors do.
    """
    out = {int(layer): np.zeros(sae.d_sae, np.float64) for layer, sae in sae_by_layer.items()}
    for chunk in _chunks(pairs):
        for layer, (base, tuned) in chunk.items():
            if int(layer) in out:
                sae = sae_by_layer[layer]
                out[int(layer)] += latent_sums(sae, tuned) - latent_sums(sae, base)
    return out


def sae_on_diff(sae_by_layer: dict[int, SAE], diffs) -> dict[int, np.ndarray]:
    """sum_tokens SAE.encode(act_ft - act_base) per layer (caft_method.md 2.3 item 3).

    Args:
      sae_by_layer: {layer: SAE}.
      diffs: {layer: (act_ft - act_base) [n, d]} (e.g. ``capture_pairs`` output), or an iterable of such dicts
        (e.g. ``iter_pairs(..., diff_only=True)``). Layers without an SAE are ignored.
    Returns:
      {layer: float64 [d_sae]}; rank with ``rank_latents(..., positive_only=True)``.
    """
    out = {int(layer): np.zeros(sae.d_sae, np.float64) for layer, sae in sae_by_layer.items()}
    for chunk in _chunks(diffs):
        for layer, diff in chunk.items():
            if int(layer) in out:
                out[int(layer)] += latent_sums(sae_by_layer[layer], diff)
    return out


def rank_latents(
    scores: dict[int, np.ndarray],
    k: int,
    *,
    per_layer: bool = True,
    largest: bool = True,
    positive_only: bool = False,
) -> dict[int, list[int]]:
    """Top-k latents by score, per layer or globally across layers.

    Args:
      scores: {layer: [d_sae]} (attribution effects, latent-sum differences, ...).
      k: latents to keep per layer (per_layer=True) or in total over all layers (per_layer=False: the authors'
        flattened global top-k of the spurious tasks).
      largest: rank by the signed value descending (the authors' ``topk(effect)``); False ranks ascending
        (``topk(-effect)``).
      positive_only: keep only latents whose score has the ranked sign (> 0 when largest, < 0 otherwise), as the
        authors do for the mean-difference rankings.
    Returns:
      {layer: [latent ids, best first]} with every input layer present (possibly an empty list). Ties break by
      layer, then latent index.
    """
    if k < 0:
        raise ConfigError(f"k must be non-negative, got {k}.")
    sign = 1.0 if largest else -1.0
    entries = []  # (layer, ids, signed scores) sorted per layer
    for layer in sorted(int(layer) for layer in scores):
        s = sign * np.asarray(scores[layer], np.float64)
        ids = np.arange(len(s))
        if positive_only:
            ids = ids[s > 0]
        order = ids[np.lexsort((ids, -s[ids]))]
        entries.append((layer, order, s[order]))
    if per_layer:
        return {layer: [int(i) for i in ids[:k]] for layer, ids, _ in entries}
    flat = [(-float(v), layer, int(i)) for layer, ids, vals in entries for i, v in zip(ids, vals, strict=True)]
    flat.sort()
    out: dict[int, list[int]] = {layer: [] for layer, _, _ in entries}
    for _, layer, i in flat[:k]:
        out[layer].append(i)
    return out
