"""JSON and JSONL files: the line-numbered reader every loader validates with, and atomic writers.

Every result file is written under a temporary name and renamed, so an interrupted run never leaves a truncated
file that a later run would silently accept. Numpy scalars and arrays are written as plain numbers and lists.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from caft_jax.errors import DataError


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _replace_atomically(path: str | os.PathLike, text: str) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically, creating parent folders."""
    _replace_atomically(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file, or None when it does not exist (a step whose result is not written yet)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete the file to recompute it.") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is), atomically, creating parent folders."""
    lines = [json.dumps(record, ensure_ascii=False, default=_json_default) + "\n" for record in records]
    _replace_atomically(path, "".join(lines))


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """Parse a JSONL file into ``[(line_number, object)]`` (1-based line numbers; blank lines skipped).

    Raises DataError naming the file (and line) when it is missing, empty, not UTF-8 or not one JSON value per line.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; pass the path of an existing .jsonl file.")
    records = []
    line_no = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path} line {line_no}: invalid JSON ({e.msg}); write one JSON object per line."
                    ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path} line {line_no + 1}: not valid UTF-8; re-save the file as UTF-8.") from None
    if not records:
        raise DataError(f"{path}: the file has no records; write one JSON object per line.")
    return records
