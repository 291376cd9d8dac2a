"""Multiple-choice accuracy for the spurious-correlation tasks (caft_method.md sections 3.2-3.3).

An item is ``{"prompt": ..., "target": " A", "other": " B", "split": ...}``. A prediction counts when the argmax
over the FULL vocabulary at the last prompt position is the target letter's token; flipped accuracy counts the
other letter instead (the accuracy on the second question of an MCMC item, whose answer is the other letter on the
0%-ambiguous test split). A model that answers neither letter counts as wrong for both.

Prompts are tokenised as in training (``data.mc_example``: the tokenizer's default special tokens), left-padded
to power-of-two buckets and run in fixed-size batches, so an evaluation compiles once per bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax.batching import SCORE_BUCKETS, left_pad
from caft_jax.data import letter_token_id
from caft_jax.errors import DataError
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Model, forward, lm_head
from caft_jax.projector import Projector

_OTHER_LETTER = {"A": "B", "B": "A"}


@functools.partial(jax.jit, static_argnames=("lora_settings",))
def last_position_logits(
    model: Model,
    tokens: jax.Array,
    attn_mask: jax.Array,
    projector: Projector | None = None,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
) -> jax.Array:
    """Next-token logits after the last column of a left-padded batch. tokens/attn_mask [b, t] -> [b, V] float32.

    The decoder runs without its LM head and the head is applied to the last position only: the full [b, t, V]
    logits would be the largest tensor of the pass (gigabytes for Gemma's 256k vocabulary), and we need 1/t of it.
    """
    out = forward(
        model,
        tokens,
        attn_mask=attn_mask,
        projector=projector,
        lora=lora,
        lora_settings=lora_settings,
        logits=False,
    )
    return lm_head(model, out.hidden[:, -1])  # [b, d] -> [b, V]


def _letter(text: str) -> str:
    return text.strip()


def item_token_ids(tokenizer, item: dict, index: int) -> tuple[list[int], int, int | None]:
    """(prompt ids, target token id, other token id or None) of one item.

    ``other`` defaults to the opposite letter when the target is A or B; otherwise flipped accuracy has no answer.
    """
    for key in ("prompt", "target"):
        if not isinstance(item.get(key), str):
            raise DataError(f"MC item {index} has no string {key!r}; each item needs 'prompt' and 'target' (' A').")
    other = item.get("other")
    if other is None and _letter(item["target"]) in _OTHER_LETTER:
        other = _OTHER_LETTER[_letter(item["target"])]
    ids = list(tokenizer(item["prompt"])["input_ids"])
    if not ids:
        raise DataError(f"MC item {index} has an empty prompt; every item needs a question.")
    other_id = letter_token_id(tokenizer, other) if other is not None else None
    return ids, letter_token_id(tokenizer, item["target"]), other_id


def predict_letters(
    model: Model,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "mc",
) -> np.ndarray:
    """Argmax token id over the full vocabulary after each prompt. Returns [n] int64, in input order."""
    from tqdm.auto import tqdm

    rows = min(batch_size, len(prompt_ids))
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # similar lengths share a bucket
    preds = np.zeros(len(prompt_ids), np.int64)
    batches = [order[i : i + rows] for i in range(0, len(order), rows)]
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        length = SCORE_BUCKETS.length_for(max(len(prompt_ids[i]) for i in idx))
        tokens, mask = left_pad([prompt_ids[i] for i in idx], rows, length, pad_id)
        mask[len(idx) :, -1] = True  # filler rows attend to one pad token, so no row is entirely masked
        logits = last_position_logits(model, jnp.asarray(tokens), jnp.asarray(mask), projector, lora, lora_settings)
        preds[idx] = np.asarray(jnp.argmax(logits, axis=-1))[: len(idx)]
    return preds


def mc_accuracy(
    model: Model,
    tokenizer,
    items: Sequence[dict],
    *,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Accuracy on multiple-choice items.

    Args:
      items: dicts with "prompt", "target" (" A"/" B"; one token) and optionally "other" (default: the other
        letter).
      lora, lora_settings, projector: the adapter and the test-time ablation, as in ``forward``.
    Returns:
      {"accuracy": share whose argmax is the target token, "flipped_accuracy": share whose argmax is the other
       letter (None when no item has one), "n": number of items, "predictions": per item {"token_id", "token",
       "correct", "flipped"}}.
    """
    from caft_jax.data import pad_token_id

    if not items:
        raise DataError("no multiple-choice items to evaluate; check the data file and split names.")
    encoded = [item_token_ids(tokenizer, item, i) for i, item in enumerate(items)]
    preds = predict_letters(
        model,
        [e[0] for e in encoded],
        pad_id=pad_token_id(tokenizer),
        lora=lora,
        lora_settings=lora_settings,
        projector=projector,
        batch_size=batch_size,
        progress=progress,
    )
    return score_predictions(preds, [e[1] for e in encoded], [e[2] for e in encoded], tokenizer)


def score_predictions(preds: np.ndarray, targets: list[int], others: list[int | None], tokenizer=None) -> dict:
    """Accuracy / flipped accuracy of predicted ids [n] against target and other ids (see ``mc_accuracy``)."""
    correct = [int(p) == t for p, t in zip(preds, targets, strict=True)]
    flipped = [None if o is None else int(p) == o for p, o in zip(preds, others, strict=True)]
    scored = [f for f in flipped if f is not None]
    predictions = [
        {
            "token_id": int(p),
            "token": tokenizer.decode([int(p)]) if tokenizer is not None else None,
            "correct": c,
            "flipped": f,
        }
        for p, c, f in zip(preds, correct, flipped, strict=True)
    ]
    return {
        "accuracy": float(np.mean(correct)),
        "flipped_accuracy": float(np.mean(scored)) if scored else None,
        "n": len(correct),
        "predictions": predictions,
    }


def evaluate_conditions(
    model: Model,
    tokenizer,
    items: Sequence[dict],
    *,
    lora: dict | None = None,
    lora_settings: LoraSettings | None = None,
    projector: Projector | None = None,
    batch_size: int = 32,
    progress: bool = True,
    extra: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """MC accuracy per split, without and (when a projector is given) with test-time ablation.

    Items are grouped by their "split" field (absent: "all"); each condition runs the model once over all items.
    Returns (rows, predictions): rows {"condition": "no_ablation" | "test_time_ablation", "split", "accuracy",
    "flipped_accuracy", "n", **extra}, one per condition and split (plus an "all" row when there are several
    splits); predictions: one dict per item and condition (item index, split, condition, and the prediction).
    """
    conditions = [("no_ablation", None)] + ([("test_time_ablation", projector)] if projector is not None else [])
    splits = [str(item.get("split", "all")) for item in items]
    groups = sorted(set(splits))
    if len(groups) > 1:
        groups.append("all")
    rows, predictions = [], []
    for name, proj in conditions:
        result = mc_accuracy(
            model,
            tokenizer,
            items,
            lora=lora,
            lora_settings=lora_settings,
            projector=proj,
            batch_size=batch_size,
            progress=progress,
        )
        preds = result["predictions"]
        for i, p in enumerate(preds):
            predictions.append({"index": i, "split": splits[i], "condition": name, **(extra or {}), **p})
        for split in groups:
            chosen = [p for p, s in zip(preds, splits, strict=True) if split in ("all", s)]
            flips = [p["flipped"] for p in chosen if p["flipped"] is not None]
            rows.append(
                {
                    "condition": name,
                    "split": split,
                    "accuracy": float(np.mean([p["correct"] for p in chosen])),
                    "flipped_accuracy": float(np.mean(flips)) if flips else None,
                    "n": len(chosen),
                    **(extra or {}),
                }
            )
    return rows, predictions
