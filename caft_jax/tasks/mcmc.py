"""Double multiple-choice ("MCMC") spurious-correlation tasks (caft_method.md section 3.2).

Two component datasets A and B (rows ``{"question", "correct", "incorrect"}``) are paired row by row into one
two-question item::

    Question: {question_a} | {question_b}
    A. {ans1}, {ans2}
    B. {ans3}, {ans4}
    Answer:

In an *ambiguous* item one option holds both correct answers, so a model trained on it cannot tell which question
the label is about; in an *unambiguous* item each option is correct for exactly one question. Training (and
validation) data are 100% ambiguous and the test split is 0% ambiguous, so test accuracy measures which question
the fine-tuned model generalised to. The ``intended`` question (0 = A, 1 = B) only chooses which letter is the
target; CAFT ablates the concept of the other, unintended question.

Every split item is a dict::

    prompt          the four-line prompt above (ends with "Answer:")
    target, other   " A" / " B" (leading space): the letter correct for the intended question, and the other one
    answer_a/_b     the letter correct for question a / question b
    ambiguous       True when answer_a == answer_b
    intended_label  the concept class of the intended question's correct answer (``answer_concept``: "positive" /
                    "negative" for sentiment, "singular" / "plural" for verbs, the answer itself otherwise);
                    spurious_label: the same for the other question (the concept CAFT ablates)
    intended_answer / spurious_answer  the two questions' correct answer strings (e.g. "has", "positive")
    question_a/_b   the two component questions; split: "train" / "val" / "test"
"""

from __future__ import annotations

import csv
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caft_jax.errors import ConfigError, DataError
from caft_jax.jsonio import read_jsonl
from caft_jax.tasks.generators import MAIN_VERBS

__all__ = [
    "COMBINATIONS",
    "COMPONENTS",
    "HUB_IDS",
    "SPLITS",
    "TEMPLATE",
    "answer_concept",
    "build_mcmc",
    "check_contamination",
    "format_prompt",
    "load_component",
    "make_item",
    "split_sizes",
]

COMPONENTS = ("verbs", "sentiment", "sports", "pronouns")
HUB_IDS = {
    "verbs": "hc-mats/subject-verb-agreement",
    "sentiment": "kh4dien/mc-sentiment",
    "sports": "hc-mats/sports-gemma-2-2b-top-1000",
    "pronouns": "kh4dien/mc-gender",
}
#: (question a, question b, intended) of the paper figure, in the order caft_method.md section 3.2 lists them
COMBINATIONS: tuple[tuple[str, str, int], ...] = (
    ("verbs", "sentiment", 1),
    ("sports", "pronouns", 0),
    ("pronouns", "sports", 0),
    ("sentiment", "verbs", 1),
    ("sentiment", "sports", 0),
    ("verbs", "sports", 0),
    ("sentiment", "pronouns", 0),
    ("verbs", "pronouns", 0),
    ("sentiment", "verbs", 0),
    ("pronouns", "sports", 1),
    ("sports", "pronouns", 1),
    ("verbs", "sentiment", 0),
    ("sports", "sentiment", 1),
    ("sports", "verbs", 1),
    ("pronouns", "sentiment", 1),
    ("pronouns", "verbs", 1),
)
REQUIRED_COLUMNS = ("question", "correct", "incorrect")
SPLITS = ("train", "val", "test")
TEMPLATE = "Question: {question_a} | {question_b}\nA. {ans1}, {ans2}\nB. {ans3}, {ans4}\nAnswer:"
_OTHER = {" A": " B", " B": " A"}
_VERB_NUMBER = {form: number for pair in MAIN_VERBS for form, number in zip(pair, ("singular", "plural"), strict=True)}
_COLUMNS_HINT = "the data need the columns question, correct, incorrect"


# ---------------------------------------------------------------------------------------------------- loading


def _check_row(row: Any, where: str) -> dict:
    """The row's three required fields as non-empty, distinct strings; DataError naming ``where`` otherwise."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: not an object with question, correct and incorrect; {_COLUMNS_HINT}.")
    for col in REQUIRED_COLUMNS:
        if col not in row:
            raise DataError(f"{where}: missing column {col!r}; {_COLUMNS_HINT}.")
        if not isinstance(row[col], str) or not row[col].strip():
            raise DataError(f"{where}: {col!r} is empty or not a string; fill in every question/correct/incorrect.")
    if row["correct"] == row["incorrect"]:
        raise DataError(f"{where}: correct and incorrect are both {row['correct']!r}; give two different answers.")
    return {col: row[col] for col in REQUIRED_COLUMNS}


def _read_csv(path: Path) -> list[dict]:
    # utf-8-sig: a CSV saved by a spreadsheet starts with a BOM, which would otherwise turn the first column into
    # "\ufeffquestion" and produce a baffling "missing column 'question'".
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in REQUIRED_COLUMNS:
            if col not in header:
                raise DataError(f"{path}: missing column {col!r} in the header {header}; {_COLUMNS_HINT}.")
        rows = [_check_row(row, f"{path} line {reader.line_num}") for row in reader]
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows; add question/correct/incorrect rows.")
    return rows


def _load_hub(hub_id: str) -> list[dict]:
    import datasets  # deferred: importing datasets costs ~1 s and local files do not need it

    try:
        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as e:  # offline this is a ConnectionError or one of datasets' own errors, depending on version
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"cannot load {hub_id} from the Hugging Face hub ({reason}); without network access pass a local CSV "
            "path (--source-a/--source-b) or use the offline generators (--offline)."
        ) from None
    for col in REQUIRED_COLUMNS:
        if col not in ds.column_names:
            raise DataError(f"{hub_id}: missing column {col!r} (has {ds.column_names}); {_COLUMNS_HINT}.")
    return [_check_row(row, f"{hub_id} row {i}") for i, row in enumerate(ds)]


def load_component(source: str | os.PathLike) -> list[dict]:
    """Rows ``{"question", "correct", "incorrect"}`` of one component dataset (extra columns are dropped).

    ``source`` is a local ``.csv`` / ``.jsonl`` file, a component name from COMPONENTS (its HUB_IDS dataset) or a
    Hugging Face hub id (``owner/name``, loaded with ``datasets.load_dataset(id, split="train")``). Raises DataError
    naming the file and line of a missing column or empty cell, or saying how to work offline when the hub is out
    of reach.
    """
    text = os.fspath(source)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl") or path.is_file():
        if not path.is_file():
            raise DataError(f"{path}: file not found; pass the path of an existing .csv or .jsonl file.")
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".jsonl":
            return [_check_row(rec, f"{path} line {line_no}") for line_no, rec in read_jsonl(path)]
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; save the component as .csv or .jsonl.")
    hub_id = HUB_IDS.get(text, text)
    if "/" not in hub_id:
        raise DataError(
            f"unknown component {text!r}; use one of {', '.join(COMPONENTS)}, a hub id such as "
            f"{HUB_IDS['sentiment']!r}, or a local .csv/.jsonl path."
        )
    return _load_hub(hub_id)


# ---------------------------------------------------------------------------------------------------- items


def format_prompt(question_a: str, question_b: str, option_a: Sequence[str], option_b: Sequence[str]) -> str:
    """The four-line MCMC prompt; ``option_a`` / ``option_b`` are (answer to a, answer to b) pairs."""
    return TEMPLATE.format(
        question_a=question_a,
        question_b=question_b,
        ans1=option_a[0],
        ans2=option_a[1],
        ans3=option_b[0],
        ans4=option_b[1],
    )


def answer_concept(row: Mapping) -> str:
    """The concept class a component row's correct answer reveals: what CAFT's directions for its question encode.

    A verb-agreement answer reveals the head subject's number ("singular" / "plural"): the eight verb forms
    themselves would make a word-identity concept of eight values, and directions that tell "has" from "does" are
    not the ones the question is about. Every other answer is its own class (sentiment: "positive" / "negative";
    pronouns: "he" / "she" / "they"; sports: the sport).
    """
    correct, incorrect = row["correct"], row["incorrect"]
    if correct in _VERB_NUMBER and _VERB_NUMBER.get(incorrect) not in (None, _VERB_NUMBER[correct]):
        return _VERB_NUMBER[correct]
    return correct


def make_item(row_a: Mapping, row_b: Mapping, intended: int, *, ambiguous: bool, swap: bool, split: str) -> dict:
    """One MCMC item (module docstring) from a row of each component dataset.

    Ambiguous: A = (a correct, b correct), B = (a incorrect, b incorrect). Unambiguous: A = (a correct,
    b incorrect), B = (a incorrect, b correct). ``swap`` then exchanges A and B.
    """
    if ambiguous:
        option_a, option_b = (row_a["correct"], row_b["correct"]), (row_a["incorrect"], row_b["incorrect"])
    else:
        option_a, option_b = (row_a["correct"], row_b["incorrect"]), (row_a["incorrect"], row_b["correct"])
    if swap:
        option_a, option_b = option_b, option_a
    # Letters follow from the construction rather than from comparing answer strings, which could coincide.
    answer_a = " B" if swap else " A"
    answer_b = answer_a if ambiguous else _OTHER[answer_a]
    target = (answer_a, answer_b)[intended]
    answers = (row_a["correct"], row_b["correct"])
    concepts = (answer_concept(row_a), answer_concept(row_b))
    return {
        "prompt": format_prompt(row_a["question"], row_b["question"], option_a, option_b),
        "target": target,
        "other": _OTHER[target],
        "split": split,
        "answer_a": answer_a,
        "answer_b": answer_b,
        "ambiguous": ambiguous,
        "intended_label": concepts[intended],
        "spurious_label": concepts[1 - intended],
        "intended_answer": answers[intended],
        "spurious_answer": answers[1 - intended],
        "question_a": row_a["question"],
        "question_b": row_b["question"],
    }


# ---------------------------------------------------------------------------------------------------- building


def split_sizes(n: int, train_frac: float = 0.7, val_frac: float = 0.5) -> tuple[int, int, int]:
    """(train, val, test) sizes: ``floor(n * train_frac)`` for train, then the rest split ``val_frac`` / rest.

    The 1e-9 keeps float error from costing an item (1000 * 0.7 must be 700, not 699).
    """
    n_train = int(n * train_frac + 1e-9)
    n_val = int((n - n_train) * val_frac + 1e-9)
    return n_train, n_val, n - n_train - n_val


def _permute_unique(rows: Sequence[Mapping], seed: int, name: str) -> list[dict]:
    """Rows in ``np.random.RandomState(seed)`` permutation order, without any question that occurs twice or more.

    Every copy of a repeated question goes (not all but one): a question seen under two labels would otherwise
    keep whichever copy the permutation put first.
    """
    checked = [_check_row(row, f"{name} item {i}") for i, row in enumerate(rows)]
    counts = Counter(row["question"] for row in checked)
    order = np.random.RandomState(seed).permutation(len(checked))
    return [checked[i] for i in order if counts[checked[i]["question"]] == 1]


def _check_settings(intended: int, max_len: int, fracs: Mapping[str, float]) -> None:
    if intended not in (0, 1):
        raise ConfigError(f"intended must be 0 (first question) or 1 (second question), got {intended!r}.")
    if max_len < 1:
        raise ConfigError(f"max_len must be at least 1, got {max_len}.")
    for name, value in fracs.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, got {value}.")


def check_contamination(splits: Mapping[str, Sequence[Mapping]]) -> None:
    """Raise DataError if a component question (question_a or question_b) occurs in more than one split.

    An overlap would put test questions into training and make the 0%-ambiguous test split partly in-distribution.
    """
    home: dict[str, str] = {}
    for name, items in splits.items():
        for item in items:
            for question in (item["question_a"], item["question_b"]):
                first = home.setdefault(question, name)
                if first != name:
                    raise DataError(
                        f"question {question!r} is in both the {first} and the {name} split; remove repeated "
                        "questions from the component datasets."
                    )


def build_mcmc(
    rows_a: Sequence[Mapping],
    rows_b: Sequence[Mapping],
    intended: int,
    *,
    max_len: int = 2000,
    train_frac: float = 0.7,
    val_frac: float = 0.5,
    train_ambiguous_frac: float = 1.0,
    test_ambiguous_frac: float = 0.0,
    seed: int = 42,
) -> dict[str, list[dict]]:
    """The MCMC splits ``{"train", "val", "test"}`` of question a (``rows_a``) paired with question b (``rows_b``).

    Steps (caft_method.md 3.2): permute each dataset with ``np.random.RandomState(seed)``, drop every question that
    occurs more than once, truncate both to ``n = min(|A|, |B|, max_len)``, pair row i of A with row i of B, cut
    ``split_sizes(n)`` (70% train, the rest 50/50 val/test), build the items, check that no question is in two
    splits. Val uses ``train_ambiguous_frac``, test ``test_ambiguous_frac``; the ambiguous items of a split are its
    first ``round(frac * len(split))`` items (the order is already random, so this is a random subset). Then one
    ``random.Random(seed)``, drawn split by split, picks ``len(split) // 2`` items of each split whose options A and
    B are swapped, so each split's answer letters are balanced.
    """
    _check_settings(
        intended,
        max_len,
        {
            "train_frac": train_frac,
            "val_frac": val_frac,
            "train_ambiguous_frac": train_ambiguous_frac,
            "test_ambiguous_frac": test_ambiguous_frac,
        },
    )
    a = _permute_unique(rows_a, seed, "rows_a")
    b = _permute_unique(rows_b, seed, "rows_b")
    n = min(len(a), len(b), max_len)
    sizes = split_sizes(n, train_frac, val_frac)
    if min(sizes) == 0:
        raise DataError(
            f"only {n} question pairs after removing repeated questions, giving splits of {sizes}; every split "
            "needs at least one item, so use larger component datasets or other split fractions."
        )
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {}
    start = 0
    fracs = (train_ambiguous_frac, train_ambiguous_frac, test_ambiguous_frac)
    for name, size, frac in zip(SPLITS, sizes, fracs, strict=True):
        n_ambiguous = round(frac * size)
        swapped = set(rng.sample(range(size), size // 2))
        splits[name] = [
            make_item(a[start + i], b[start + i], intended, ambiguous=i < n_ambiguous, swap=i in swapped, split=name)
            for i in range(size)
        ]
        start += size
    check_contamination(splits)
    return splits


def component_rows(
    name: str, source: str | None = None, *, offline: bool = True, generator_seed: int = 0, flag: str = "--source"
) -> list[dict]:
    """Rows of component ``name``: from ``source`` (a local CSV/JSONL, a hub id, or "hub" for the authors' dataset),
    else from this project's offline generator (``offline``) or the authors' hub dataset. ``flag`` names the
    command-line option for the source in the error message."""
    from caft_jax.tasks.generators import GENERATORS

    if source == "hub" or (not source and not offline):
        return load_component(HUB_IDS[name])
    if source:
        return load_component(source)
    if name not in GENERATORS:
        raise ConfigError(
            f"{name} has no offline generator (it tests a model's knowledge of real athletes); pass {flag} PATH "
            f"to a local copy of {HUB_IDS[name]}, such as sports.csv."
        )
    return GENERATORS[name](seed=generator_seed)
