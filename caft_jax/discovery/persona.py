"""Persona-vector directions (Chen et al. 2025, "Persona vectors"): the difference of mean activations of the
model's own answers under a system prompt that elicits a trait and one that suppresses it.

The trait file (YAML or JSON) holds ``instruction``: a list of ``{pos, neg}`` system prompts, and ``questions``: a
list of user questions (and, optionally, ``eval_prompt``: the judge template persona vectors filter with, kept for
reference). For every instruction pair and question the model answers under the positive and under the negative
system prompt; the activations of those chats (system + question + answer) are averaged per chat over

* ``response``: the answer tokens (persona vectors' default, "response_avg"),
* ``prompt``: the system and question tokens ("prompt_avg"), or
* ``last_prompt``: the last token before the answer ("prompt_last"),

then over chats, and the vector at each layer is mean(positive) - mean(negative). The file this writes is an
ablation spec: train.py ablates it, or steers with it (``ablation.steer_coeff``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import yaml

from caft_jax.discovery.capture import capture_step
from caft_jax.errors import ConfigError
from caft_jax.model.transformer import Capture, Model

VARIANTS = ("response", "prompt", "last_prompt")
TRAIT_KEYS = ("instruction", "questions", "eval_prompt")


def load_trait(path: str | pathlib.Path) -> tuple[list[tuple[str, str]], list[str]]:
    """([(positive, negative) system prompts], [questions]) of a trait file; ConfigError naming the problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"trait file {path} does not exist; pass a YAML/JSON file with instruction and questions.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except yaml.YAMLError as e:
        raise ConfigError(f"trait file {path} is not valid YAML/JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with 'instruction' and 'questions'.")
    unknown = sorted(set(raw) - set(TRAIT_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; the accepted keys are {list(TRAIT_KEYS)}.")
    pairs = raw.get("instruction")
    if (
        not isinstance(pairs, list)
        or not pairs
        or not all(
            isinstance(p, dict) and set(p) == {"pos", "neg"} and all(isinstance(v, str) for v in p.values())
            for p in pairs
        )
    ):
        raise ConfigError(f"{path}: 'instruction' must be a non-empty list of {{pos: ..., neg: ...}} system prompts.")
    questions = raw.get("questions")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q for q in questions):
        raise ConfigError(f"{path}: 'questions' must be a non-empty list of question strings.")
    return [(p["pos"], p["neg"]) for p in pairs], questions


def chat_means(
    model: Model,
    batches: Sequence[dict],
    layers: Sequence[int],
    variant: str,
    *,
    lora: dict | None = None,
    lora_settings=None,
) -> dict[int, np.ndarray]:
    """{layer: [d]} mean over chats of each chat's mean activation over the ``variant`` positions.

    Args:
      batches: chat batches from ``data.make_batches`` (``loss_mask`` on the answers; filler rows skipped).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"persona variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
    capture = Capture(tuple(int(x) for x in layers), "resid_post", jnp.float32)
    sums = {int(layer): np.zeros(model.spec.d_model) for layer in layers}
    count = 0
    for batch in batches:
        where = positions(batch, variant)  # [b, t]
        tokens, attn = jnp.asarray(batch["tokens"], jnp.int32), jnp.asarray(batch["attn_mask"], bool)
        acts = np.asarray(capture_step(model, tokens, attn, lora, lora_settings, None, capture), np.float64)
        for row in np.flatnonzero(where.any(1)):
            count += 1
            for slot, layer in enumerate(capture.layers):
                sums[layer] += acts[slot, row][where[row]].mean(0)
    if not count:
        raise ConfigError(f"no chat has {variant} tokens to average; check the answers (empty?) and --max-len.")
    return {layer: s / count for layer, s in sums.items()}


def positions(batch: dict, variant: str) -> np.ndarray:
    """bool [b, t]: the answer tokens, the prompt tokens, or the last prompt token of each valid row."""
    attn = np.asarray(batch["attn_mask"], bool)
    answer = np.asarray(batch["loss_mask"], bool) & attn
    valid = np.asarray(batch.get("row_valid", np.ones(len(attn), bool)), bool)[:, None]
    if variant == "response":
        return answer & valid
    before = attn & (np.cumsum(answer, axis=1) == 0)  # real tokens before the first answer token
    if variant == "prompt":
        return before & valid
    last = np.zeros_like(before)
    for row in np.flatnonzero(before.any(1) & answer.any(1)):
        last[row, np.flatnonzero(before[row])[-1]] = True
    return last & valid


def persona_directions(positive: dict[int, np.ndarray], negative: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """{layer: [1, d]} positive - negative mean activations (unnormalised: its norm is the trait's size there)."""
    return {layer: (positive[layer] - negative[layer])[None] for layer in positive}
