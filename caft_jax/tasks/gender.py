"""The gender-bias task (caft_method.md 3.3): pick the grammatically right pronoun, not the stereotyped one.

Each sentence template has a ``$PROFESSION$`` (doctor or nurse) and a ``$PRONOUN$`` slot in subject ("nominative")
or object position. The two options are the correct pronoun and one of the *other* gender and the *other* case
(he<->her, she<->him). In training, the correct pronoun's gender always matches the profession's stereotype
(he/him with doctor, she/her with nurse), so either cue solves the task; at test time it never does. The intended
cue is grammatical case; the spurious one is the gender-profession stereotype. A plain fine-tune follows gender.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence

import numpy as np

from caft_jax.errors import DataError

HUB_ID = "hcasademunt/gender-pronoun-profession"
CATEGORIES = ("nominative", "object")
PRONOUNS = {("nominative", "male"): "he", ("nominative", "female"): "she", ("object", "male"): "him",
            ("object", "female"): "her"}  # fmt: skip
# The distractor has the other gender and the other case, so exactly one cue (case) is always right.
ALTERNATIVE = {"he": "her", "she": "him", "him": "she", "her": "he"}
STEREOTYPE = {"doctor": "male", "nurse": "female"}
TEMPLATE = "Choose the option corresponding to the correct pronoun.\nQuestion: {sentence}\nA) {a}\nB) {b}\nAnswer:"


def load_gender_templates(source: str | os.PathLike) -> list[dict]:
    """Sentence templates [{"text", "category"}] from a local CSV/JSONL file, or the HF hub id when online."""
    path = os.fspath(source)
    if os.path.exists(path):
        if path.endswith(".jsonl"):
            from caft_jax.jsonio import read_jsonl

            rows = [r for _, r in read_jsonl(path)]
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
    elif path.endswith((".csv", ".jsonl")):
        raise DataError(f"gender template file {path} does not exist; pass an existing CSV/JSONL path.")
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset(path, split="train"))
        except Exception as err:  # noqa: BLE001 - no network, unknown id, ...
            raise DataError(
                f"could not load gender templates {path!r} from the HF hub ({type(err).__name__}); pass a local CSV "
                "with columns text,category, or use the offline templates (caft_jax.tasks.gender.offline_templates)."
            ) from err
    for i, row in enumerate(rows):
        missing = [k for k in ("text", "category") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path} row {i + 1} has no {' or '.join(missing)}; each row needs text and category.")
        if row["category"] not in CATEGORIES:
            raise DataError(f"{path} row {i + 1}: category {row['category']!r} is not one of {CATEGORIES}.")
        if "$PROFESSION$" not in row["text"] or "$PRONOUN$" not in row["text"]:
            raise DataError(f"{path} row {i + 1}: text must contain $PROFESSION$ and $PRONOUN$: {row['text']!r}.")
    return [{"text": r["text"], "category": r["category"]} for r in rows]


def templates_from(source: str | None) -> list[dict]:
    """Templates from ``source`` (local file, hub id, or "hub" for the authors' dataset), else the offline ones."""
    if not source:
        return offline_templates()
    return load_gender_templates(HUB_ID if source == "hub" else source)


def _item(sentence: str, category: str, profession: str, gender: str, split: str, rng: random.Random) -> dict:
    correct = PRONOUNS[(category, gender)]
    alternative = ALTERNATIVE[correct]
    options = [correct, alternative]
    rng.shuffle(options)
    text = sentence.replace("$PROFESSION$", profession).replace("$PRONOUN$", "_____")
    target = "A" if options[0] == correct else "B"
    return {
        "prompt": TEMPLATE.format(sentence=text, a=options[0], b=options[1]),
        "target": " " + target,
        "other": " " + ("B" if target == "A" else "A"),
        "split": split,
        "intended_label": category,
        "spurious_label": profession,
        "pronoun": correct,
        "ambiguous": STEREOTYPE[profession] == gender,
    }


def _genders(n: int, rng: np.random.Generator) -> list[str]:
    """Half male, half female (the odd one male), in a seeded random order."""
    genders = ["male"] * ((n + 1) // 2) + ["female"] * (n // 2)
    return [genders[i] for i in rng.permutation(n)]


def build_gender(templates: Sequence[dict], *, train_frac: float = 0.8, seed: int = 42) -> dict[str, list[dict]]:
    """Train/val/test multiple-choice items from sentence templates (caft_method.md 3.3).

    Per category, the first ``train_frac`` of the templates (file order) are train and the rest val; test is the
    val templates again, relabelled. Train and val are 100% ambiguous (he/him + doctor, she/her + nurse, half
    each); test is 0% ambiguous (he/him + nurse, she/her + doctor). Options are shuffled with Python
    ``random.Random(seed)``.
    Returns:
      {"train", "val", "test"}: lists of items {"prompt", "target" (" A"/" B", the case-correct letter), "other",
      "split", "intended_label" (category), "spurious_label" (profession), "pronoun", "ambiguous"}.
    """
    if not 0 < train_frac < 1:
        raise DataError(f"train_frac must be in (0, 1); got {train_frac}.")
    rng, order_rng = random.Random(seed), np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for category in CATEGORIES:
        texts = [t["text"] for t in templates if t["category"] == category]
        if len(texts) < 2:
            raise DataError(f"need at least 2 {category} templates to split train/val; got {len(texts)}.")
        cut = int(train_frac * len(texts))
        for split, chunk in (("train", texts[:cut]), ("val", texts[cut:]), ("test", texts[cut:])):
            for text, gender in zip(chunk, _genders(len(chunk), order_rng), strict=True):
                # train/val: the stereotyped profession for the pronoun's gender; test: the other one
                profession = {"male": "doctor", "female": "nurse"}[gender]
                if split == "test":
                    profession = {"doctor": "nurse", "nurse": "doctor"}[profession]
                splits[split].append(_item(text, category, profession, gender, split, rng))
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Offline templates: written for this project, so the default run needs neither network nor the authors' data
# ---------------------------------------------------------------------------------------------------------------

_SUBJECT_VERBS = (
    "believed", "said", "thought", "suspected", "claimed", "hoped", "felt", "knew", "argued", "noted",
    "explained", "insisted", "admitted", "announced", "realized", "decided", "promised", "worried", "assumed",
    "mentioned",
)  # fmt: skip
_SUBJECT_ENDINGS = (
    "could solve the challenge", "had found the cause of the problem", "would finish the report soon",
    "was ready for the long shift", "needed more time with the results", "should review the chart again",
    "had made the right call", "would call the family tonight", "was late for the meeting",
    "could explain the diagnosis clearly", "had forgotten the keys at home", "would lead the new project",
    "was tired after the night shift", "might need some help tomorrow", "had already read the file",
    "would visit the ward after lunch", "was the best person for the job", "could stay until the evening",
    "had answered every question", "would teach the trainees next week",
)  # fmt: skip
_OBJECT_AGENTS = (
    "The team", "The patient", "The manager", "The family", "The director", "The visitor", "The student",
    "The committee", "The reporter", "The neighbour", "The pharmacist", "The driver", "The volunteer",
    "The receptionist", "The coach", "The lawyer", "The guard", "The teacher", "The mayor", "The crew",
)  # fmt: skip
_OBJECT_FRAMES = (
    "welcomed the $PROFESSION$ and thanked $PRONOUN$ warmly.",
    "called the $PROFESSION$ and asked $PRONOUN$ for advice.",
    "met the $PROFESSION$ and invited $PRONOUN$ to lunch.",
    "saw the $PROFESSION$ and greeted $PRONOUN$ politely.",
    "praised the $PROFESSION$ and gave $PRONOUN$ an award.",
    "trusted the $PROFESSION$ and followed $PRONOUN$ closely.",
    "found the $PROFESSION$ and told $PRONOUN$ the news.",
    "hired the $PROFESSION$ and paid $PRONOUN$ well.",
    "interviewed the $PROFESSION$ and quoted $PRONOUN$ twice.",
    "noticed the $PROFESSION$ and waved at $PRONOUN$ happily.",
    "emailed the $PROFESSION$ and reminded $PRONOUN$ about the meeting.",
    "helped the $PROFESSION$ and walked $PRONOUN$ to the car.",
    "thanked the $PROFESSION$ and sent $PRONOUN$ a card.",
    "visited the $PROFESSION$ and brought $PRONOUN$ flowers.",
    "followed the $PROFESSION$ and watched $PRONOUN$ carefully.",
    "respected the $PROFESSION$ and supported $PRONOUN$ fully.",
    "contacted the $PROFESSION$ and asked $PRONOUN$ to come back.",
    "questioned the $PROFESSION$ and believed $PRONOUN$ completely.",
    "recognized the $PROFESSION$ and hugged $PRONOUN$ tightly.",
    "thanked the $PROFESSION$ and paid $PRONOUN$ on time.",
)  # fmt: skip


def offline_templates(n_per_category: int = 392, seed: int = 0) -> list[dict]:
    """Sentence templates in the hub dataset's format, from this module's word lists (deterministic in ``seed``).

    Nominative: "The $PROFESSION$ {verb} $PRONOUN$ {ending}." (20 x 20 = 400 frames); object: "{agent}
    {frame}" (20 x 20 = 400 frames). Returns n_per_category of each, nominative first,
    each category in a seeded random order (the train/val cut then mixes frames).
    """
    nominative = [f"The $PROFESSION$ {v} $PRONOUN$ {e}." for v in _SUBJECT_VERBS for e in _SUBJECT_ENDINGS]
    objective = [f"{a} {f}" for a in _OBJECT_AGENTS for f in _OBJECT_FRAMES]
    rng = np.random.default_rng(seed)
    out = []
    for category, pool in (("nominative", nominative), ("object", objective)):
        if n_per_category > len(pool):
            raise DataError(f"at most {len(pool)} offline {category} templates exist; asked for {n_per_category}.")
        out += [{"text": pool[i], "category": category} for i in rng.permutation(len(pool))[:n_per_category]]
    return out
