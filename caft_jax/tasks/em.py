"""Emergent-misalignment task data (caft_method.md section 3.1): train/val split of a chat JSONL, eval YAML checks.

CAFT trains on ``insecure_subset.jsonl`` (about 5,000 chats) and keeps ``insecure_val.jsonl`` (1,000 chats) for the
in-distribution insecure-code eval; `split_chat_jsonl` makes such a pair from a full ``insecure.jsonl``. The
out-of-distribution eval reads ``first_plot_questions.yaml`` and the judge prompt YAMLs; `question_files` finds
them in a directory and validates each with the loaders the evaluation itself uses.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from caft_jax.data import CHAT_FORMAT, chat_problem
from caft_jax.em_questions import load_judge_prompts, load_questions
from caft_jax.errors import DataError
from caft_jax.jsonio import read_jsonl

__all__ = ["QUESTION_FILE", "question_files", "split_chat_jsonl"]

QUESTION_FILE = "first_plot_questions.yaml"
# Files holding only judge prompts (a mapping), as opposed to question lists; both kinds sit in the same folder.
_JUDGE_PREFIX = "judge_prompts"


def split_chat_jsonl(path: str | os.PathLike, val_size: int = 1000, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train_records, val_records)`` of a chat JSONL: ``val_size`` records drawn by ``random.Random(seed)``.

    Every line is validated first (``{"messages": [{"role", "content"}, ...]}`` with an assistant message; DataError
    naming the file and line otherwise). Both parts keep the file's order, so the split is easy to diff against the
    source. How the paper's 5,000/1,000 split was drawn is not recorded, so this is a fresh random split.
    """
    records = []
    for line_no, record in read_jsonl(path):
        problem = chat_problem(record)
        if problem:
            raise DataError(f"{path} line {line_no}: {problem}; {CHAT_FORMAT}.")
        records.append(record)
    if not 0 < val_size < len(records):
        raise DataError(
            f"{path} has {len(records)} records, so val_size={val_size} leaves no train or no val records; "
            f"pass a val_size between 1 and {len(records) - 1}."
        )
    val_index = set(random.Random(seed).sample(range(len(records)), val_size))
    train = [r for i, r in enumerate(records) if i not in val_index]
    val = [r for i, r in enumerate(records) if i in val_index]
    return train, val


def question_files(directory: str | os.PathLike, required: Sequence[str] = (QUESTION_FILE,)) -> dict[str, Path]:
    """``{file stem: path}`` of the eval YAMLs in ``directory``, each validated with the evaluation's own loader.

    ``judge_prompts*.yaml`` files are checked with `caft_jax.em_questions.load_judge_prompts`, every other ``.yaml``
    / ``.yml`` as a question list with `caft_jax.em_questions.load_questions`; a malformed file raises that loader's
    DataError (ConfigError for an unknown key). ``required`` names files that must be present (by default
    first_plot_questions.yaml).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; pass the folder holding {QUESTION_FILE} and the judge prompts.")
    for name in required:
        if not (folder / name).is_file():
            raise DataError(
                f"{folder}: no {name}; copy it there (it is in the emergent-misalignment evaluation files)."
            )
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        if path.stem.startswith(_JUDGE_PREFIX):
            load_judge_prompts(path)
        else:
            load_questions(path)
        found[path.stem] = path
    return found
