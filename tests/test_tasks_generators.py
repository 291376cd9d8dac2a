"""Tests for caft_jax.tasks.generators: determinism, uniqueness, format, and hand-checked correct answers."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from caft_jax.tasks import generators, mcmc

# Hand-written here, independently of the generator's tables.
SINGULAR_FORMS = {"is", "has", "does", "goes"}
PAIRS = {("is", "are"), ("has", "have"), ("does", "do"), ("goes", "go")}
NOMINATIVE, OBJECTIVE = {"he", "she", "they"}, {"him", "her", "them"}
# words after the blank that read correctly with he, she and they alike
NUMBER_NEUTRAL = {"would", "could", "should", "might", "will", "can", "must", "had"}
NUMBER_NEUTRAL |= {"forgot", "understood", "made", "knew", "found"}


@pytest.fixture(scope="module")
def made():
    return {name: gen(seed=0) for name, gen in generators.GENERATORS.items()}


def test_registry_has_no_sports():
    assert set(generators.GENERATORS) == {"verbs", "sentiment", "pronouns"}


@pytest.mark.parametrize("name", ["verbs", "sentiment", "pronouns"])
def test_deterministic_unique_and_well_formed(made, name):
    rows = made[name]
    assert len(rows) >= 1000
    assert generators.GENERATORS[name](seed=0) == rows
    assert generators.GENERATORS[name](seed=1) != rows
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"question", "correct", "incorrect"} and r["correct"] != r["incorrect"]
        assert "{" not in r["question"] and "}" not in r["question"]


def test_verbs_agree_with_the_head_subject(made):
    rows = made["verbs"]
    assert 3000 <= len(rows) <= 5000
    for r in rows:
        assert r["question"].startswith("Choose the correct verb form for the following sentence: The ")
        assert (r["correct"], r["incorrect"]) in PAIRS or (r["incorrect"], r["correct"]) in PAIRS
        words = r["question"].split(": ", 1)[1].split()
        subject = words[1]  # "The {subject} ..."
        plural = subject.endswith("s") or subject in {"men", "women"}  # no singular subject noun ends in s
        assert (r["correct"] in SINGULAR_FORMS) == (not plural), r
        if words[2] == "that":  # "The {subject} that the {object} {verb}": the inner verb agrees with the object
            obj, verb = words[4], words[5]
            assert obj.endswith("s") != verb.endswith("s"), r
        else:
            assert words[2] in {"near", "behind", "beside"} and words[3] == "the" and len(words) == 5
    frames = Counter("that" in r["question"].split() for r in rows)
    assert frames[True] == frames[False]  # half prepositional, half relative-clause
    assert all(400 <= k <= 600 for k in Counter(r["correct"] for r in rows).values())  # 8 forms, balanced


def test_verbs_hand_checked_cases():
    every_pp = {r["question"].split(": ", 1)[1]: r for r in generators.subject_verb_agreement(seed=3, n=9600)}
    assert every_pp["The men near the dog"]["correct"] in {"are", "have", "do", "go"}
    assert every_pp["The woman behind the cars"]["correct"] in SINGULAR_FORMS
    assert every_pp["The uncles beside the trees"]["correct"] in {"are", "have", "do", "go"}
    assert every_pp["The kid near the executives"]["correct"] in SINGULAR_FORMS


def test_sentiment_labels_and_articles(made):
    rows = made["sentiment"]
    counts = Counter(r["correct"] for r in rows)
    assert (counts["positive"], counts["negative"]) == (583, 584)
    positive = {"brilliant", "wonderful", "delightful", "superb", "charming"}
    negative = {"awful", "terrible", "boring", "dull", "lame"}
    checked = 0
    for r in rows:
        assert r["question"].startswith("What is the sentiment of the following sentence? ")
        assert {r["correct"], r["incorrect"]} == {"positive", "negative"}
        sentence = r["question"].split("? ", 1)[1]
        words = set(re.findall(r"[a-z]+", sentence.lower()))
        if words & positive:
            assert r["correct"] == "positive" and not words & negative, r
            checked += 1
        if words & negative:
            assert r["correct"] == "negative", r
            checked += 1
        assert not re.search(r"\b[Aa] [aeiou]", sentence) and not re.search(r"\b[Aa]n [^aeiou]", sentence), r
    assert checked > 100


def test_pronoun_blank_is_a_subject(made):
    rows = made["pronouns"]
    assert Counter(r["correct"] for r in rows).keys() == NOMINATIVE
    for r in rows:
        assert r["correct"] in NOMINATIVE and r["incorrect"] in OBJECTIVE
        words = r["question"].rstrip(".").split()
        assert words.count("_") == 1 and r["question"].startswith(("The ", "Before the "))
        after = words[words.index("_") + 1]
        assert after in NUMBER_NEUTRAL or after.endswith("ed"), r
        # the word before the blank opens a clause, so the blank is that clause's subject, not an object
        assert words[words.index("_") - 1] in {"that", "because", "whether", "until", "after", "what"}, r


def test_generated_components_build_an_mcmc_task(made):
    splits = mcmc.build_mcmc(made["verbs"], made["sentiment"], 1)
    assert [len(splits[s]) for s in mcmc.SPLITS] == [816, 175, 176]  # n = min(4000, 1167), as with the hub data


def test_sizes_out_of_range_raise():
    with pytest.raises(ValueError, match="n must be between 1 and 8000"):
        generators.pronouns(n=9000)
    with pytest.raises(ValueError, match="n must be between 1 and 9600"):
        generators.subject_verb_agreement(n=10_000)
