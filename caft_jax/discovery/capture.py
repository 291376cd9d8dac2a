"""Residual-stream activation capture for direction discovery (caft_method.md sections 2.1-2.2).

Every function here runs the same jitted ``forward`` as training, with a ``Capture`` spec and ``logits=False``, one
batch at a time, and moves the selected tokens' activations to host memory (float32) before the next batch.

Batches are the dicts of ``caft_jax.data`` (left-padded ``tokens``, ``attn_mask``, ``loss_mask``, ``row_valid``).
Token selection (``mask``):

* ``"answer"``: positions whose ``loss_mask`` is True (the answer tokens of chat / "Question: ... Answer: ..." data,
  the authors' choice for emergent misalignment);
* ``"nonpad"``: every real token (``attn_mask``), BOS included (the authors' choice for the spurious tasks).

``exclude_first=True`` also drops each row's first real token (the attention sink, whose activations can be orders
of magnitude larger than the rest; see issue 4 item 4).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.discovery.pca import PCAResult, StreamingPCA
from caft_jax.errors import ConfigError, DataError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Capture, Model, forward
from caft_jax.projector import Projector

MASKS = ("answer", "nonpad")
SITES = ("resid_post", "resid_mid")


# ---------------------------------------------------------------------------------------------------------------
# Position masks
# ---------------------------------------------------------------------------------------------------------------


def first_token_mask(attn_mask) -> np.ndarray:
    """True at each row's first real token (the BOS / attention-sink position of a left-padded row). bool [b, t]."""
    attn_mask = np.asarray(attn_mask, bool)
    return attn_mask & (np.cumsum(attn_mask, axis=-1) == 1)


def positions_mask(batch: dict, mask: str = "answer", *, exclude_first: bool = False) -> np.ndarray:
    """The positions of ``batch`` to keep: bool [b, t].

    Args:
      batch: a batch dict (``attn_mask`` [b, t]; ``loss_mask`` [b, t] for "answer"; optional ``row_valid`` [b]).
      mask: "answer" (loss_mask) or "nonpad" (attn_mask).
      exclude_first: also drop each row's first real token (attention sink).
    """
    if mask not in MASKS:
        raise ConfigError(f"token mask {mask!r} is unknown; use one of {', '.join(MASKS)}.")
    key = "loss_mask" if mask == "answer" else "attn_mask"
    if key not in batch:
        raise DataError(f"mask {mask!r} needs batches with a {key!r} array; build them with caft_jax.data.")
    keep = np.asarray(batch[key], bool) & np.asarray(batch["attn_mask"], bool)
    if "row_valid" in batch:
        keep &= np.asarray(batch["row_valid"], bool)[:, None]
    if exclude_first:
        keep &= ~first_token_mask(batch["attn_mask"])
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Jitted capture passes
# ---------------------------------------------------------------------------------------------------------------


def _check_args(model: Model, layers: Sequence[int], site: str, lora, lora_settings) -> tuple[int, ...]:
    if site not in SITES:
        raise ConfigError(f"capture site {site!r} is unknown; use one of {', '.join(SITES)}.")
    layers = tuple(int(layer) for layer in layers)
    n = model.spec.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n]
    if not layers or bad:
        raise ConfigError(f"capture layers {list(layers)} must be a non-empty list of indices in [0, {n}).")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"capture layers {list(layers)} contain duplicates; list each layer once.")
    if lora is not None and lora_settings is None:
        raise ConfigError("LoRA weights were given without lora_settings; pass LoraConfig.settings().")
    return layers


def _eval_settings(lora_settings: LoraSettings | None) -> LoraSettings | None:
    """The same LoRA scale with dropout off: capture passes are inference."""
    return None if lora_settings is None else LoraSettings(scale=lora_settings.scale, dropout=0.0)


def _captured(model, tokens, attn_mask, lora, lora_settings, projector, capture) -> jax.Array:
    out = forward(
        model,
        tokens,
        attn_mask=attn_mask,
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        capture=capture,
        logits=False,
    )
    return out.captured


@functools.partial(jax.jit, static_argnames=("lora_settings", "capture"))
def capture_step(model, tokens, attn_mask, lora, lora_settings, projector, capture):
    """[n_layers, b, t, d] float32 activations of one batch."""
    return _captured(model, tokens, attn_mask, lora, lora_settings, projector, capture)


@functools.partial(jax.jit, static_argnames=("base_lora_settings", "tuned_lora_settings", "capture", "diff_only"))
def _pair_step(
    base, tuned, tokens, attn_mask, base_lora, base_lora_settings, tuned_lora, tuned_lora_settings, capture, diff_only
):
    """Base and tuned activations of one batch: (base, tuned), or tuned - base when diff_only. [n, b, t, d] each."""
    a = _captured(base, tokens, attn_mask, base_lora, base_lora_settings, None, capture)
    b = _captured(tuned, tokens, attn_mask, tuned_lora, tuned_lora_settings, None, capture)
    return b - a if diff_only else (a, b)


def _progress(batches, progress: bool, desc: str):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _device_batch(batch: dict) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(batch["tokens"], jnp.int32), jnp.asarray(batch["attn_mask"], bool)


def iter_activations(
    model: Model,
    batches: Iterable[dict],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    mask: str = "answer",
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    exclude_first: bool = False,
    progress: bool = False,
) -> Iterator[dict[int, np.ndarray]]:
    """Yield, per batch, ``{layer: float32 [n_selected, d]}`` of the selected positions (row-major order)."""
    layers = _check_args(model, layers, site, lora, lora_settings)
    capture = Capture(layers, site, jnp.float32)
    settings = _eval_settings(lora_settings)
    for batch in _progress(batches, progress, "capture"):
        keep = positions_mask(batch, mask, exclude_first=exclude_first)
        acts = np.asarray(capture_step(model, *_device_batch(batch), lora, settings, projector, capture))
        yield {layer: acts[i][keep] for i, layer in enumerate(layers)}


def _concat(chunks: Iterable[dict[int, np.ndarray]], layers: Sequence[int], d: int) -> dict[int, np.ndarray]:
    parts: dict[int, list[np.ndarray]] = {int(layer): [] for layer in layers}
    for chunk in chunks:
        for layer, x in chunk.items():
            parts[layer].append(x)
    return {layer: np.concatenate(xs, axis=0) if xs else np.zeros((0, d), np.float32) for layer, xs in parts.items()}


def capture_activations(
    model: Model,
    batches: Iterable[dict],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    mask: str = "answer",
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    exclude_first: bool = False,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Residual activations of the selected tokens of every batch, gathered on the host.

    Args:
      model: the model (params on device).
      batches: iterable of batch dicts (see module docstring).
      layers: layer indices; layer l's "resid_post" is the output of decoder layer l (HF ``hidden_states[l + 1]``
        before the final norm), "resid_mid" the residual between its attention and MLP blocks.
      site: "resid_post" or "resid_mid".
      mask: "answer" or "nonpad" (see module docstring).
      lora, lora_settings: optional LoRA adapter applied in the forward (dropout off).
      projector: optional ablation projector applied in the forward.
      exclude_first: drop each row's first real token.
      progress: show a progress bar.
    Returns:
      {layer: float32 [n_tokens, d_model]}, tokens in batch order, then row-major within a batch.
    """
    chunks = iter_activations(
        model,
        batches,
        layers,
        site=site,
        mask=mask,
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        exclude_first=exclude_first,
        progress=progress,
    )
    return _concat(chunks, layers, model.spec.d_model)


def _tuned_parts(base_model: Model, tuned, lora_settings):
    """(tuned model, tuned LoRA, settings) for ``tuned`` given as a Model or as a LoRA tree on ``base_model``."""
    if isinstance(tuned, Model):
        if tuned.spec != base_model.spec:
            raise ConfigError("the tuned model's architecture differs from the base model's; compare matching models.")
        return tuned, None, None
    if isinstance(tuned, dict):
        if lora_settings is None:
            raise ConfigError("a LoRA tree was given as the tuned model without lora_settings; pass cfg.settings().")
        return base_model, tuned, _eval_settings(lora_settings)
    raise ConfigError(f"tuned must be a Model or a LoRA weight tree, got {type(tuned).__name__}.")


def iter_pairs(
    base_model: Model,
    tuned,
    batches: Iterable[dict],
    layers: Sequence[int],
    *,
    lora_settings: LoraSettings | None = None,
    site: str = "resid_post",
    mask: str = "answer",
    exclude_first: bool = False,
    diff_only: bool = False,
    progress: bool = False,
) -> Iterator[dict]:
    """Run base and tuned models on the same tokens, yielding per batch the selected positions' activations.

    Args:
      base_model: the reference model.
      tuned: the fine-tuned model, either a Model (e.g. a full fine-tune or a merged LoRA) or a LoRA tree applied on
        ``base_model`` (then ``lora_settings`` is required).
      batches, layers, site, mask, exclude_first, progress: as in ``capture_activations``.
      diff_only: yield tuned - base only (computed on device; one transfer per batch).
    Yields:
      {layer: (base float32 [n_selected, d], tuned float32 [n_selected, d])}, or {layer: tuned - base} if diff_only.
    """
    layers = _check_args(base_model, layers, site, None, None)
    tuned_model, tuned_lora, tuned_settings = _tuned_parts(base_model, tuned, lora_settings)
    capture = Capture(layers, site, jnp.float32)
    for batch in _progress(batches, progress, "capture pairs"):
        keep = positions_mask(batch, mask, exclude_first=exclude_first)
        out = _pair_step(
            base_model, tuned_model, *_device_batch(batch), None, None, tuned_lora, tuned_settings, capture, diff_only
        )
        if diff_only:
            diff = np.asarray(out)
            yield {layer: diff[i][keep] for i, layer in enumerate(layers)}
        else:
            a, b = np.asarray(out[0]), np.asarray(out[1])
            yield {layer: (a[i][keep], b[i][keep]) for i, layer in enumerate(layers)}


def capture_pairs(
    base_model: Model,
    tuned,
    batches: Iterable[dict],
    layers: Sequence[int],
    *,
    lora_settings: LoraSettings | None = None,
    site: str = "resid_post",
    mask: str = "answer",
    exclude_first: bool = False,
    accumulators: dict[int, StreamingPCA] | None = None,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Per-layer activation differences tuned - base on the same tokens (caft_method.md 2.1 step 3).

    Only the difference leaves the device, batch by batch; neither model's full activations are kept.

    Args:
      base_model, tuned, lora_settings, batches, layers, site, mask, exclude_first, progress: see ``iter_pairs``.
      accumulators: {layer: StreamingPCA}; when given, each batch's differences are added to them and NOT kept,
        so memory stays constant in the token count, and the returned dict is empty.
    Returns:
      {layer: float32 [n_tokens, d_model]} of tuned - base (empty when ``accumulators`` is given).
    """
    chunks = iter_pairs(
        base_model,
        tuned,
        batches,
        layers,
        lora_settings=lora_settings,
        site=site,
        mask=mask,
        exclude_first=exclude_first,
        diff_only=True,
        progress=progress,
    )
    if accumulators is None:
        return _concat(chunks, layers, base_model.spec.d_model)
    missing = [int(layer) for layer in layers if int(layer) not in accumulators]
    if missing:
        raise ConfigError(f"accumulators has no StreamingPCA for layers {missing}; make one per captured layer.")
    for chunk in chunks:
        for layer, diff in chunk.items():
            accumulators[layer].update(diff)
    return {}


def pair_pca(
    base_model: Model,
    tuned,
    batches: Iterable[dict],
    layers: Sequence[int],
    *,
    n_components: int = 20,
    lora_settings: LoraSettings | None = None,
    site: str = "resid_post",
    mask: str = "answer",
    exclude_first: bool = False,
    progress: bool = True,
) -> dict[int, PCAResult]:
    """Streaming PCA of tuned - base differences per layer, in constant memory: {layer: PCAResult}."""
    accumulators = {int(layer): StreamingPCA(base_model.spec.d_model) for layer in layers}
    capture_pairs(
        base_model,
        tuned,
        batches,
        layers,
        lora_settings=lora_settings,
        site=site,
        mask=mask,
        exclude_first=exclude_first,
        accumulators=accumulators,
        progress=progress,
    )
    return {layer: acc.finalize(n_components) for layer, acc in accumulators.items()}


def capture_sequences(
    model: Model,
    ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    pad_id: int,
    *,
    site: str = "resid_post",
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    batch_size: int = 32,
    length: int | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Activations of whole sequences (every position), left-padded to one length, for per-sequence statistics.

    Args:
      ids: token ids per sequence; length: padded length (default: the longest sequence).
    Returns:
      ({layer: float32 [n_seq, t, d]}, attn_mask bool [n_seq, t]).
    """
    from caft_jax import data

    length = length or max(len(i) for i in ids)
    batch = data.pad_and_stack(ids, [[False] * len(i) for i in ids], length, pad_id)
    capture = Capture(tuple(int(x) for x in layers), site, jnp.float32)
    chunks: dict[int, list[np.ndarray]] = {int(layer): [] for layer in layers}
    for lo in range(0, len(ids), batch_size):
        tokens = jnp.asarray(batch["tokens"][lo : lo + batch_size])
        mask = jnp.asarray(batch["attn_mask"][lo : lo + batch_size])
        captured = capture_step(model, tokens, mask, lora, _eval_settings(lora_settings), None, capture)
        for slot, layer in enumerate(capture.layers):
            chunks[layer].append(np.asarray(captured[slot]))
    return {layer: np.concatenate(c) for layer, c in chunks.items()}, batch["attn_mask"]
