"""Text corpora for discovery: reading a local corpus file (``iter_texts``) and tokenising texts into left-padded,
bucketed batches (``text_batches``). Displays and SAE training stream their activations from these."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator

from caft_jax.batching import PROMPT_BUCKETS, left_pad
from caft_jax.errors import DataError


def _record_text(record, field: str | None) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    if field is not None:
        value = record.get(field)
        return value if isinstance(value, str) else None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    if isinstance(record.get("prompt"), str):
        return record["prompt"] + str(record.get("target", record.get("completion", "")))
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return f"Question: {record['question']}\nAnswer: {record['answer']}"
    return None


def iter_texts(path: str | os.PathLike, *, field: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Stream texts from a local corpus file.

    Args:
      path: ``.jsonl`` (one JSON object per line: ``field``, else "text", else chat "messages" joined, else
        "prompt" + "target", else "question"/"answer"; a line may also be a bare JSON string) or ``.txt``
        (documents separated by blank lines).
      field: the JSONL field holding the text (default: detected per record as above).
      limit: stop after this many texts.
    Yields:
      non-empty strings.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found; pass an existing .jsonl or .txt file.")
    count = 0

    def done():
        return limit is not None and count >= limit

    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if done():
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path} line {line_no}: invalid JSON ({e.msg}); write one object per line."
                    ) from None
                text = _record_text(record, field)
                if text is None:
                    want = repr(field) if field else "'text', 'messages', 'prompt' or 'question'/'answer'"
                    raise DataError(f"{path} line {line_no}: no text field {want}; pass field= to name it.")
                if text.strip():
                    count += 1
                    yield text
    elif path.suffix == ".txt":
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in [*f, "\n"]:
                if line.strip():
                    block.append(line)
                    continue
                if block and not done():
                    count += 1
                    yield "".join(block).rstrip("\n")
                block = []
    else:
        raise DataError(f"{path}: unsupported corpus format {path.suffix!r}; use .jsonl or .txt.")


def text_batches(tokenizer, texts: Iterable[str], batch_size: int, max_len: int, pad_id: int):
    """Yield (first_text_index, n_rows, tokens [b, t] int32, attn_mask [b, t] bool), left-padded to a bucket."""
    start = 0
    chunk: list[str] = []

    def encode(chunk):
        ids = tokenizer(list(chunk), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        ids = [x if len(x) else [pad_id] for x in ids]  # an empty encoding still occupies its row
        t = min(PROMPT_BUCKETS.length_for(max(len(x) for x in ids)), max_len)
        tokens, mask = left_pad(ids, batch_size, t, pad_id)
        mask[len(ids) :, -1] = True  # filler rows: one visible token so attention has a key
        return tokens, mask

    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"corpus item {start + len(chunk)} is {type(text).__name__}, not a string.")
        chunk.append(text)
        if len(chunk) == batch_size:
            yield start, len(chunk), *encode(chunk)
            start += len(chunk)
            chunk = []
    if chunk:
        yield start, len(chunk), *encode(chunk)
