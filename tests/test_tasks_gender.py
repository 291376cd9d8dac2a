"""Tests for caft_jax.tasks.gender and the `gender` command: splits, ambiguity, options, template, offline templates."""

from __future__ import annotations

import csv
import json
import pathlib
import re

import pytest

from caft_jax.data import load_mc_jsonl
from caft_jax.errors import DataError
from caft_jax.tasks import cli, gender

GENDER_CSV = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "spurious" / "gender.csv"

# Written out here (not imported) so the tests check the module against caft_method.md 3.3, not against itself.
PRONOUN_INFO = {"he": ("nominative", "male"), "she": ("nominative", "female"), "him": ("object", "male"),
                "her": ("object", "female")}  # fmt: skip
STEREOTYPE = {"doctor": "male", "nurse": "female"}
HEADER = "Choose the option corresponding to the correct pronoun."


def csv_texts() -> dict[str, list[str]]:
    """{category: template texts in file order} read straight from the CSV."""
    out: dict[str, list[str]] = {"nominative": [], "object": []}
    with open(GENDER_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[row["category"]].append(row["text"])
    return out


def parse(item: dict) -> dict:
    """Question sentence and the two options of an item's prompt (asserting the exact 5-line template)."""
    lines = item["prompt"].split("\n")
    assert len(lines) == 5, item["prompt"]
    assert lines[0] == HEADER
    assert lines[1].startswith("Question: ")
    assert re.fullmatch(r"A\) \w+", lines[2]) and re.fullmatch(r"B\) \w+", lines[3]), item["prompt"]
    assert lines[4] == "Answer:"
    return {"sentence": lines[1][len("Question: ") :], "a": lines[2][3:], "b": lines[3][3:]}


@pytest.fixture(scope="module")
def templates():
    return gender.load_gender_templates(GENDER_CSV)


@pytest.fixture(scope="module")
def splits(templates):
    return gender.build_gender(templates)


def test_sizes_and_per_category_split(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 626, "val": 158, "test": 158}
    for name, per_category in (("train", 313), ("val", 79), ("test", 79)):
        items = splits[name]
        assert [it["intended_label"] for it in items] == ["nominative"] * per_category + ["object"] * per_category
        assert all(it["split"] == name for it in items)


def test_items_come_from_the_templates_in_file_order(splits):
    """Train = first 80% of each category (file order), val = the rest; test = the val templates relabelled."""
    texts = csv_texts()
    expected = {
        "train": texts["nominative"][:313] + texts["object"][:313],
        "val": texts["nominative"][313:] + texts["object"][313:],
    }
    expected["test"] = expected["val"]
    for name, items in splits.items():
        for template, item in zip(expected[name], items, strict=True):
            sentence = parse(item)["sentence"]
            assert "$" not in item["prompt"]
            assert sentence.count("_____") == 1
            assert sentence == template.replace("$PROFESSION$", item["spurious_label"]).replace("$PRONOUN$", "_____")
    # the same 158 sentences, but every test item has the other profession for its pronoun's gender
    assert [parse(it)["sentence"].replace("nurse", "doctor") for it in splits["val"]] == [
        parse(it)["sentence"].replace("nurse", "doctor") for it in splits["test"]
    ]


def test_ambiguity_train_val_all_test_none(splits):
    for name, ambiguous in (("train", True), ("val", True), ("test", False)):
        for item in splits[name]:
            case, pronoun_gender = PRONOUN_INFO[item["pronoun"]]
            assert case == item["intended_label"]
            assert item["spurious_label"] in STEREOTYPE
            assert (STEREOTYPE[item["spurious_label"]] == pronoun_gender) is ambiguous
            assert item["ambiguous"] is ambiguous
    # train/val: he/him only with doctor, she/her only with nurse; test: the reverse
    pairs = {name: {(it["pronoun"], it["spurious_label"]) for it in items} for name, items in splits.items()}
    stereo = {("he", "doctor"), ("him", "doctor"), ("she", "nurse"), ("her", "nurse")}
    assert pairs["train"] == pairs["val"] == stereo
    assert pairs["test"] == {("he", "nurse"), ("him", "nurse"), ("she", "doctor"), ("her", "doctor")}


def test_half_male_half_female_per_category(splits):
    for name, items in splits.items():
        for category, n in (("nominative", 313 if name == "train" else 79), ("object", 313 if name == "train" else 79)):
            genders = [PRONOUN_INFO[it["pronoun"]][1] for it in items if it["intended_label"] == category]
            assert len(genders) == n
            assert genders.count("male") == (n + 1) // 2  # the odd one is male
            assert genders != sorted(genders) and genders != sorted(genders, reverse=True)  # shuffled, not blocks


def test_options_and_target(splits):
    for items in splits.values():
        for item in items:
            p = parse(item)
            correct = item["pronoun"]
            assert correct in (p["a"], p["b"]) and p["a"] != p["b"]
            distractor = p["b"] if p["a"] == correct else p["a"]
            # the distractor has the other case and the other gender
            (case, sex), (d_case, d_sex) = PRONOUN_INFO[correct], PRONOUN_INFO[distractor]
            assert d_case != case and d_sex != sex
            assert distractor == gender.ALTERNATIVE[correct]
            letter = item["target"].strip()
            assert item["target"] in (" A", " B") and item["other"] == (" B" if letter == "A" else " A")
            assert p[letter.lower()] == correct  # the target letter points at the case-correct pronoun
            assert item["prompt"] == gender.TEMPLATE.format(sentence=p["sentence"], a=p["a"], b=p["b"])


def test_letter_positions_roughly_balanced(splits):
    for name, items in splits.items():
        share_a = sum(it["target"] == " A" for it in items) / len(items)
        assert 0.4 <= share_a <= 0.6, (name, share_a)
        # each pronoun is the answer at A about as often as at B (position carries no gender or case cue)
        for pronoun in ("he", "she", "him", "her"):
            mine = [it for it in items if it["pronoun"] == pronoun]
            assert 0.2 <= sum(it["target"] == " A" for it in mine) / len(mine) <= 0.8, (name, pronoun)


def test_deterministic_in_seed(templates, splits):
    assert gender.build_gender(templates) == splits
    assert gender.build_gender(templates, seed=42) == splits
    other = gender.build_gender(templates, seed=7)
    assert other != splits
    assert [it["intended_label"] for it in other["test"]] == [it["intended_label"] for it in splits["test"]]
    # seed changes the option order and the gender assignment, not the templates
    assert sum(a["target"] != b["target"] for a, b in zip(other["train"], splits["train"], strict=True)) > 100


def test_build_gender_rejects_bad_arguments(templates):
    with pytest.raises(DataError, match="train_frac"):
        gender.build_gender(templates, train_frac=1.0)
    with pytest.raises(DataError, match="at least 2 object templates"):
        gender.build_gender([t for t in templates if t["category"] == "nominative"])


# ---------------------------------------------------------------------------------------------------- offline


def test_offline_templates_counts_and_placeholders():
    rows = gender.offline_templates()
    assert len(rows) == 784
    by_cat = {c: [r["text"] for r in rows if r["category"] == c] for c in ("nominative", "object")}
    assert [r["category"] for r in rows] == ["nominative"] * 392 + ["object"] * 392
    for texts in by_cat.values():
        assert len(texts) == 392 and len(set(texts)) == 392
        assert all(t.count("$PROFESSION$") == 1 and t.count("$PRONOUN$") == 1 for t in texts)
    assert gender.offline_templates() == rows  # deterministic
    other = gender.offline_templates(seed=1)
    assert other != rows and sorted(r["text"] for r in other) != sorted(r["text"] for r in rows)
    assert len(gender.offline_templates(400)) == 800  # every frame
    with pytest.raises(DataError, match="at most 400"):
        gender.offline_templates(401)
    # through build_gender they give the paper's sizes
    assert {k: len(v) for k, v in gender.build_gender(rows).items()} == {"train": 626, "val": 158, "test": 158}


AUXILIARIES = {"could", "would", "should", "might", "may", "must", "can", "will", "had", "has", "was", "is", "did"}
IRREGULAR_PAST = {"said", "thought", "felt", "knew", "gave", "told", "paid", "sent", "brought", "saw", "met", "found"}


def is_past_verb(word: str) -> bool:
    return word.endswith("ed") or word in IRREGULAR_PAST


def test_offline_nominative_templates_put_the_pronoun_in_subject_position():
    for row in gender.offline_templates():
        if row["category"] != "nominative":
            continue
        m = re.fullmatch(r"The \$PROFESSION\$ (\w+) \$PRONOUN\$ (\w+) [\w ]+\.", row["text"])
        assert m, row["text"]
        # "The doctor believed he could ...": a reporting verb, then the pronoun as the subject of a finite verb
        assert is_past_verb(m.group(1)), row["text"]
        assert m.group(2) in AUXILIARIES or is_past_verb(m.group(2)), row["text"]


def test_offline_object_templates_put_the_pronoun_in_object_position():
    for row in gender.offline_templates():
        if row["category"] != "object":
            continue
        m = re.fullmatch(r"The \w+ (\w+) the \$PROFESSION\$ and (\w+)( at)? \$PRONOUN\$( [\w ]+)?\.", row["text"])
        assert m, row["text"]
        # "The team welcomed the nurse and thanked her ...": the pronoun is the object of the second verb
        assert is_past_verb(m.group(1)) and is_past_verb(m.group(2)), row["text"]


# ---------------------------------------------------------------------------------------------------- loading


def write_csv(path: pathlib.Path, header: list[str], rows: list[list[str]]) -> pathlib.Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


GOOD = ["The $PROFESSION$ said $PRONOUN$ was late.", "nominative"]


def test_load_templates_from_csv_and_jsonl(tmp_path, templates):
    assert len(templates) == 784 and templates[0] == {
        "text": "The $PROFESSION$ believed $PRONOUN$ could solve the challenge.",
        "category": "nominative",
    }
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({**t, "extra": 1}) + "\n" for t in templates[:5]))
    assert gender.load_gender_templates(jsonl) == templates[:5]  # extra fields dropped


def test_load_templates_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=re.escape(str(path))):
        gender.load_gender_templates(path)


def test_load_templates_missing_column(tmp_path):
    path = write_csv(tmp_path / "cols.csv", ["text", "kind"], [GOOD, GOOD])
    with pytest.raises(DataError) as err:
        gender.load_gender_templates(path)
    assert str(path) in str(err.value) and "row 1" in str(err.value) and "category" in str(err.value)


def test_load_templates_bad_category(tmp_path):
    path = write_csv(tmp_path / "cat.csv", ["text", "category"], [GOOD, GOOD, [GOOD[0], "subject"]])
    with pytest.raises(DataError) as err:
        gender.load_gender_templates(path)
    assert str(path) in str(err.value) and "row 3" in str(err.value) and "'subject'" in str(err.value)


@pytest.mark.parametrize("text", ["The doctor said $PRONOUN$ was late.", "The $PROFESSION$ said he was late."])
def test_load_templates_text_without_placeholders(tmp_path, text):
    path = write_csv(tmp_path / "text.csv", ["text", "category"], [GOOD, [text, "object"]])
    with pytest.raises(DataError) as err:
        gender.load_gender_templates(path)
    assert str(path) in str(err.value) and "row 2" in str(err.value) and text in str(err.value)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_gender_offline(tmp_path):
    assert cli.main(["gender", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "task.json").read_text())
    assert info == {
        "task": "gender",
        "source": "offline templates",
        "seed": 42,
        "sizes": {"train": 626, "val": 158, "test": 158},
    }
    expected = gender.build_gender(gender.offline_templates())
    for name in ("train", "val", "test"):
        assert load_mc_jsonl(tmp_path / f"{name}.jsonl") == expected[name]


def test_cli_gender_from_source(tmp_path, splits):
    assert cli.main(["gender", "--source", str(GENDER_CSV), "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "task.json").read_text())
    assert info["source"] == str(GENDER_CSV) and info["sizes"] == {"train": 626, "val": 158, "test": 158}
    for name in ("train", "val", "test"):
        assert load_mc_jsonl(tmp_path / f"{name}.jsonl") == splits[name]
    assert cli.main(["gender", "--source", str(GENDER_CSV), "--seed", "3", "--out", str(tmp_path / "s3")]) == 0
    assert load_mc_jsonl(tmp_path / "s3" / "train.jsonl") != splits["train"]


def test_cli_gender_bad_source(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert cli.main(["gender", "--source", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
