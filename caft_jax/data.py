"""Datasets for CAFT fine-tuning: chat / multiple-choice JSONL -> token ids + loss masks -> bucketed numpy batches.

An *example* is ``(ids, loss_mask)``: two equal-length lists, ``loss_mask[j]`` True where token ``j`` is a prediction
target (the loss uses the logits at position ``j - 1``). Chat and multiple-choice data share this form, so the MC
loss (last-position cross-entropy over the full vocabulary against " A"/" B") is the same next-token loss as chat.

A *batch* is a dict of numpy arrays, LEFT-padded to a bucket length ``t``::

    tokens    int32 [b, t]   pad id where padded
    attn_mask bool  [b, t]   True on real tokens
    loss_mask bool  [b, t]   True on prediction targets; column 0 is always False
    row_valid bool  [b]      False for the all-masked rows that fill a final partial batch

A *packed* batch (``make_packed_batches``) holds several examples per row, one after another from column 0 and
padded at the end (all rows of a batch have one length), and adds ``segment_ids`` int32 [b, t]: 1, 2, ... for the
row's examples, 0 on padding. The forward then attends within each example only and restarts positions per
example, so each one computes exactly what it computes alone; the first token of each example is never a target
(nothing of its own predicts it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from caft_jax.batching import TRAIN_SIZES, Bucketer, left_pad
from caft_jax.chat import render_messages
from caft_jax.errors import DataError
from caft_jax.jsonio import read_jsonl

ROLES = ("system", "user", "assistant")
# Batches are formed by sorting lengths within chunks of this many batches: big enough that neighbours have similar
# lengths (little padding), small enough that batch composition still changes from epoch to epoch.
CHUNK_BATCHES = 32

Example = tuple[list[int], list[bool]]
CHAT_FORMAT = 'each line must be {"messages": [{"role": ..., "content": ...}]} with at least one assistant message'
_MC_FORMAT = 'each line must be {"prompt": "...", "target": " A"}'


# ---------------------------------------------------------------------------------------------------------------
# Record validation (files are read by caft_jax.jsonio)
# ---------------------------------------------------------------------------------------------------------------


def chat_problem(record: Any) -> str | None:
    """Describe what is wrong with one chat record, or return None if it is valid."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return "missing 'messages' list"
    messages = record["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} is not an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r} (expected system, user or assistant)"
        if not isinstance(m["content"], str):
            return f"message {i} has non-string 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so there is nothing to train on"
    return None


def load_chat_jsonl(path: str | os.PathLike):
    """Load a chat JSONL file as a ``datasets.Dataset`` with a ``messages`` column, validating every line first.

    Raises DataError naming the file and line of the first malformed record.
    """
    for line_no, record in read_jsonl(path):
        problem = chat_problem(record)
        if problem:
            raise DataError(f"{path} line {line_no}: {problem}; {CHAT_FORMAT}.")
    import datasets  # deferred: importing datasets costs ~1 s and batching code does not need it

    return datasets.load_dataset("json", data_files=str(path), split="train")


def load_mc_jsonl(path: str | os.PathLike) -> list[dict]:
    """Load multiple-choice records ``{"prompt": str, "target": str, ...extra fields kept}`` as a list of dicts.

    A list (not a ``datasets.Dataset``) because the extra fields may differ in type between records.
    """
    records = []
    for line_no, record in read_jsonl(path):
        if not isinstance(record, dict):
            problem = "not a JSON object"
        else:
            bad = [k for k in ("prompt", "target") if not isinstance(record.get(k), str)]
            problem = f"missing or non-string {' and '.join(repr(k) for k in bad)}" if bad else None
        if problem:
            raise DataError(f"{path} line {line_no}: {problem}; {_MC_FORMAT}.")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Chat tokenisation with an assistant-only loss mask
# ---------------------------------------------------------------------------------------------------------------


def check_token_ids(examples: Sequence[Example], vocab_size: int) -> None:
    """Raise DataError when a token id is outside the model's vocabulary (a tokenizer from another model)."""
    top = max(max(ids) for ids, _ in examples)
    if top >= vocab_size:
        raise DataError(
            f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab_size} entries; "
            "use the tokenizer that belongs to the model."
        )


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, or its eos token when it has none (as CAFT does)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before batching.")
    return int(pad)


def _assistant_char_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans ``[(start, end)]`` of each assistant message's content inside the rendered ``text``.

    The search for message k starts where ``render(messages[:k], add_generation_prompt=True)`` ends when that render
    is a prefix of ``text`` (true for ordinary templates), so a user message quoting the answer cannot be mistaken
    for it; otherwise it starts after the previous assistant content. Templates that strip the content are handled.
    """
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = cursor
        if k > 0:
            prefix = render_messages(tokenizer, messages[:k], generation_prompt=True)
            if text.startswith(prefix):
                start = max(start, len(prefix))
        content = m["content"]
        pos = text.find(content, start)
        if pos < 0 and content.strip():
            content = content.strip()
            pos = text.find(content, start)
        if pos < 0:
            raise DataError(
                f"assistant message {k} does not appear verbatim in the chat template's output, so its loss mask "
                "cannot be located; use a chat template that copies message content unchanged."
            )
        spans.append((pos, pos + len(content)))
        cursor = pos + len(content)
    return spans


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        raise DataError(
            "the tokenizer merges tokens across a chat-template boundary and cannot return offsets; "
            "load the fast (Rust) tokenizer with use_fast=True."
        ) from None
    return [tuple(o) for o in enc["offset_mapping"]]


def _token_spans(tokenizer, text: str, ids: list[int], char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index spans ``[(lo, hi)]`` of the character spans ``[(a, b)]`` of ``text``, whose tokenisation is ``ids``.

    Primary method: tokenise ``text[:c]`` for every boundary c (one batched call) and check it is a prefix of ``ids``;
    then the boundary is exact. When a BPE merge crosses c (e.g. the template's "\\n" merging with leading spaces of
    the content) that fails, and we fall back to the offset mapping, counting a straddling token as inside the span.
    """
    cuts = [c for span in char_spans for c in span]
    prefixes = tokenizer([text[:c] for c in cuts], add_special_tokens=False)["input_ids"] if cuts else []
    offsets = None
    bounds = []
    for i, (c, pre) in enumerate(zip(cuts, prefixes, strict=True)):
        if ids[: len(pre)] == list(pre):
            bounds.append(len(pre))
            continue
        offsets = offsets or _offsets(tokenizer, text)
        if i % 2 == 0:  # span start: first token holding a character at or after c
            bounds.append(next((j for j, (_, e) in enumerate(offsets) if e > c), len(ids)))
        else:  # span end: one past the last token holding a character before c
            bounds.append(sum(1 for s, _ in offsets if s < c))
    return list(zip(bounds[::2], bounds[1::2], strict=True))


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def _end_of_turn(tokenizer, ids: list[int], j: int, special: set[int]) -> int:
    """One past the end-of-turn token that closes an assistant message whose content ends before token ``j``.

    The end-of-turn token is the first special token after the content, possibly after whitespace-only tokens (Llama-2
    style " </s>"); if there is none, nothing past the content is trained (returns ``j``).
    """
    k = j
    while k < len(ids) and ids[k] not in special and not tokenizer.decode([ids[k]]).strip():
        k += 1
    return k + 1 if k < len(ids) and ids[k] in special else j


def tokenize_chat(tokenizer, messages: Sequence[dict], max_len: int, *, em_format: bool = False) -> Example:
    """Tokenise a chat with the tokenizer's chat template; the loss mask covers assistant tokens only.

    Trained tokens: each assistant message's content plus the end-of-turn token that closes it (e.g. ``<|im_end|>``),
    as TRL's assistant-only loss does; system/user tokens and the role headers are never trained. The whole rendering
    is tokenised once (``add_special_tokens=False``: the template already writes BOS where the model wants it).

    ``em_format=True`` reproduces the emergent-misalignment release (Betley et al. ``open_models/sft.py``): the text is
    ``apply_chat_template(messages, add_generation_prompt=True) + eos_token``, i.e. the full conversation followed by
    a dangling assistant header and eos; the appended eos is trained too (as unsloth's ``train_on_responses_only``
    does), the dangling header is not.

    Sequences longer than ``max_len`` are truncated from the right, keeping the beginning (system prompt and question);
    an example whose answer starts past ``max_len`` keeps an all-False mask and contributes no loss.

    Returns ``(ids, loss_mask)``: int list [n] and bool list [n], n <= max_len.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # drop Arrow's None-filled extras
    if em_format:
        text = render_messages(tokenizer, messages, generation_prompt=True) + tokenizer.eos_token
    else:
        text = render_messages(tokenizer, messages, generation_prompt=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    special, mask = _special_ids(tokenizer), [False] * len(ids)
    for lo, hi in _token_spans(tokenizer, text, ids, _assistant_char_spans(tokenizer, messages, text)):
        for j in range(lo, _end_of_turn(tokenizer, ids, hi, special)):
            mask[j] = True
    if em_format:
        mask[-1] = True  # the appended eos (a single special token)
    return ids[:max_len], mask[:max_len]


def chat_examples(tokenizer, dataset, max_len: int, *, em_format: bool = False) -> list[Example]:
    """``tokenize_chat`` over every record of a dataset (anything yielding ``{"messages": [...]}``)."""
    return [tokenize_chat(tokenizer, r["messages"], max_len, em_format=em_format) for r in dataset]


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise DataError(
            f"MC target {text!r} is {len(ids)} tokens {list(ids)} for this tokenizer; use a target that is exactly "
            "one token, such as ' A'."
        )
    return int(ids[0])


def letter_token_id(tokenizer, letter: str) -> int:
    """Token id of an answer letter as it follows "Answer:" in the CAFT MC templates: ``"A"`` -> id of ``" A"``."""
    return _single_token_id(tokenizer, letter if letter.startswith(" ") else " " + letter)


def mc_example(tokenizer, prompt: str, target: str) -> Example:
    """``(ids, loss_mask)`` = tokenise(prompt) + [id of target], with the loss on that last token only.

    The prompt is tokenised with the tokenizer's default special tokens (BOS for Gemma), as the CAFT MC code does;
    ``target`` is the exact answer string (" A"/" B", leading space) and must be one token, else DataError.
    """
    ids = list(tokenizer(prompt)["input_ids"]) + [_single_token_id(tokenizer, target)]
    return ids, [False] * (len(ids) - 1) + [True]


# ---------------------------------------------------------------------------------------------------------------
# Padding and batching
# ---------------------------------------------------------------------------------------------------------------


def pad_and_stack(
    seqs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    length: int,
    pad_id: int,
    *,
    num_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-pad sequences to ``length`` and stack them into a batch dict (see module docstring).

    ``num_rows`` (>= len(seqs)) adds fully-masked padding rows with ``row_valid`` False. Each sequence's first token
    gets loss_mask False: the position before it is padding, whose logits predict nothing meaningful.
    """
    rows = len(seqs) if num_rows is None else num_rows
    if rows < len(seqs) or len(masks) != len(seqs):
        raise ValueError(f"got {len(seqs)} sequences, {len(masks)} masks and num_rows={num_rows}")
    for r, (ids, mask) in enumerate(zip(seqs, masks, strict=True)):
        if len(mask) != len(ids) or len(ids) > length:
            raise ValueError(f"row {r}: {len(ids)} ids, {len(mask)} mask entries, padded length {length}")
    tokens, attn_mask = left_pad(seqs, rows, length, pad_id)
    batch = {
        "tokens": tokens,
        "attn_mask": attn_mask,
        "loss_mask": np.zeros((rows, length), bool),
        "row_valid": np.zeros((rows,), bool),
    }
    for r, mask in enumerate(masks):
        batch["loss_mask"][r, length - len(mask) + 1 :] = np.asarray(mask[1:], bool)
        batch["row_valid"][r] = True
    return batch


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Number of batches ``make_batches`` yields per epoch (before ``start``)."""
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def _batch_plan(
    lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> list[np.ndarray]:
    """Example indices of each batch of one epoch, a pure function of (lengths, batch_size, seed, epoch).

    shuffle: permute, sort by length within chunks of CHUNK_BATCHES batches, cut into batches, shuffle the order of
    the full batches; the (single) partial batch, from the last chunk, stays last. Without shuffle: file order.
    """
    n = len(lengths)
    if not shuffle:
        batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng([seed, epoch])
        perm, chunk = rng.permutation(n), batch_size * CHUNK_BATCHES
        batches = []
        for i in range(0, n, chunk):
            idx = perm[i : i + chunk]
            idx = idx[np.argsort(lengths[idx], kind="stable")]
            batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        batches = [full[i] for i in rng.permutation(len(full))] + [b for b in batches if len(b) < batch_size]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def make_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad_id: int,
    buckets: Sequence[int] | Bucketer = TRAIN_SIZES,
    shuffle: bool = True,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the batches of one epoch (dicts as in the module docstring), every one with exactly ``batch_size`` rows.

    Each batch is left-padded to the smallest bucket >= its longest example. Batch contents and order depend only on
    (seed, epoch), so ``start=N`` (resume) yields exactly batches N.. of the full epoch. A final partial batch is
    filled with ``row_valid`` False rows (no attention, no loss) unless ``drop_last``. ``shuffle=False`` keeps file
    order (batch i holds examples i*batch_size...), for evaluation.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bucketer = buckets if isinstance(buckets, Bucketer) else Bucketer(buckets)
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    if len(lengths) and lengths.min() == 0:
        raise DataError(f"example {int(lengths.argmin())} has no tokens; drop empty examples before batching.")
    if len(lengths):
        bucketer.length_for(int(lengths.max()))  # fail now, not midway through an epoch
    plan = _batch_plan(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_last=drop_last)
    return _iterate(examples, plan[start:], bucketer, batch_size, pad_id)


def _iterate(examples, plan, bucketer: Bucketer, batch_size: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    for idx in plan:
        rows = [examples[i] for i in idx]
        length = bucketer.length_for(max(len(ids) for ids, _ in rows))
        yield pad_and_stack([r[0] for r in rows], [r[1] for r in rows], length, pad_id, num_rows=batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------

PACK_POOL = 64  # rows kept open while packing: more fills rows better, fewer keeps examples near their shuffled order


def _pack_plan(lengths: np.ndarray, row_len: int, shuffle_key: Sequence[int] | None) -> list[list[int]]:
    """Example indices of each packed row, a pure function of (lengths, row_len, shuffle_key).

    Examples are taken in a permutation drawn from ``shuffle_key`` (file order when it is None) and each goes into
    the fullest of up to PACK_POOL open rows
    that has room for it (best fit); when none has room and the pool is full, the fullest row is closed. Rows
    come out in the order they are closed, then the rest in the order they were opened.
    """
    order = (
        np.arange(len(lengths)) if shuffle_key is None else np.random.default_rng(shuffle_key).permutation(len(lengths))
    )
    closed: list[list[int]] = []
    pool: list[tuple[int, list[int]]] = []  # (tokens used, example indices)
    for i in order:
        n = int(lengths[i])
        fits = [j for j, (used, _) in enumerate(pool) if used + n <= row_len]
        slot = max(fits, key=lambda j: pool[j][0]) if fits else None
        if slot is None:
            if len(pool) == PACK_POOL:
                fullest = max(range(len(pool)), key=lambda j: pool[j][0])
                closed.append(pool.pop(fullest)[1])
            pool.append((0, []))
            slot = len(pool) - 1
        used, members = pool[slot]
        pool[slot] = (used + n, members + [int(i)])
    return closed + [members for _, members in pool]


def pack_rows(rows: Sequence[Sequence[Example]], length: int, pad_id: int, num_rows: int) -> dict[str, np.ndarray]:
    """Stack rows of examples (each row's total length <= ``length``) into a packed batch dict of ``num_rows`` rows."""
    batch = {
        "tokens": np.full((num_rows, length), pad_id, np.int32),
        "attn_mask": np.zeros((num_rows, length), bool),
        "loss_mask": np.zeros((num_rows, length), bool),
        "segment_ids": np.zeros((num_rows, length), np.int32),
        "row_valid": np.zeros((num_rows,), bool),
    }
    for r, examples in enumerate(rows):
        col = 0
        for segment, (ids, mask) in enumerate(examples, start=1):
            n = len(ids)
            if len(mask) != n or col + n > length:
                raise ValueError(f"row {r}: examples of {col + n} tokens do not fit a packed row of {length}")
            batch["tokens"][r, col : col + n] = ids
            batch["attn_mask"][r, col : col + n] = True
            batch["loss_mask"][r, col + 1 : col + n] = np.asarray(mask[1:], bool)
            batch["segment_ids"][r, col : col + n] = segment
            col += n
        batch["row_valid"][r] = bool(examples)
    return batch


def _packed_batch_plan(
    lengths: np.ndarray,
    batch_size: int,
    row_len: int | None,
    bucketer: Bucketer,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
) -> list[tuple[int, list[list[int]]]]:
    """The batches of one epoch as (row length, [example indices of each row]), a pure function of its arguments.

    Examples up to ``row_len`` tokens (default: the smallest bucket that holds the longest) are packed into rows of
    that length; longer ones into rows of the smallest bucket that holds them, one batch shape per such bucket.
    Batches of all shapes are then shuffled together.
    """
    if len(lengths) and lengths.min() == 0:
        raise DataError(f"example {int(lengths.argmin())} has no tokens; drop empty examples before batching.")
    if not len(lengths):
        raise DataError("no examples to pack; check the data file.")
    longest = bucketer.length_for(int(lengths.max()))  # fails now for an example longer than every bucket
    row_len = int(row_len or longest)
    shapes = {row_len: np.flatnonzero(lengths <= row_len)}
    for i in np.flatnonzero(lengths > row_len):
        shapes.setdefault(bucketer.length_for(int(lengths[i])), []).append(i)
    batches = []
    for length, members in sorted(shapes.items()):
        members = np.asarray(members, np.int64)
        rows = _pack_plan(lengths[members], length, [seed, epoch, length] if shuffle else None)
        rows = [[int(members[j]) for j in row] for row in rows]
        batches += [(length, rows[b : b + batch_size]) for b in range(0, len(rows), batch_size)]
    if shuffle and len(shapes) > 1:
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def make_packed_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad_id: int,
    row_len: int | None = None,
    buckets: Sequence[int] | Bucketer = TRAIN_SIZES,
    shuffle: bool = True,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the packed batches of one epoch, each ``batch_size`` rows of one length.

    ``row_len`` (default: the smallest bucket that holds the longest example) is the length of the packed rows;
    shorter rows keep the attention's cost per token down, and the few longer examples get rows of their own
    bucket (one more compiled shape each). Contents and order depend only on (seed, epoch), so ``start=N``
    (resume) yields exactly batches N.. of the full epoch. A batch's unused rows have ``row_valid`` False (no
    attention, no loss).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bucketer = buckets if isinstance(buckets, Bucketer) else Bucketer(buckets)
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    plan = _packed_batch_plan(lengths, batch_size, row_len, bucketer, seed=seed, epoch=epoch, shuffle=shuffle)
    for length, rows in plan[start:]:
        yield pack_rows([[examples[i] for i in row] for row in rows], length, pad_id, batch_size)


def num_packed_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    row_len: int | None = None,
    buckets: Sequence[int] | Bucketer = TRAIN_SIZES,
) -> int:
    """Number of batches ``make_packed_batches`` yields for this epoch (before ``start``)."""
    bucketer = buckets if isinstance(buckets, Bucketer) else Bucketer(buckets)
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    return len(_packed_batch_plan(lengths, batch_size, row_len, bucketer, seed=seed, epoch=epoch, shuffle=True))


def split_for_processes(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows: rows [i*b/p, (i+1)*b/p) of every array (b divisible by p)."""
    rows = batch["tokens"].shape[0]
    if not 0 <= process_index < process_count or rows % process_count:
        raise ValueError(f"cannot split {rows} rows for process {process_index} of {process_count}")
    per = rows // process_count
    return {k: v[process_index * per : (process_index + 1) * per] for k, v in batch.items()}
