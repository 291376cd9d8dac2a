"""Tests for caft_jax.tasks.mcmc and the `mcmc` / `list` commands: sizes, ambiguity, template, swaps, errors."""

from __future__ import annotations

import json
import pathlib
import sys
import types

import pytest

from caft_jax.data import load_mc_jsonl
from caft_jax.errors import ConfigError, DataError
from caft_jax.tasks import cli, mcmc

SPURIOUS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "spurious"
FILES = {"verbs": "sva.csv", "sentiment": "sentiment.csv", "sports": "sports.csv", "pronouns": "gender_mc.csv"}
DUPLICATED = "The librarian told the patron that _ would be on vacation next week."  # twice in gender_mc.csv


@pytest.fixture(scope="module")
def real():
    """{component: rows} from the raw copies of the hub datasets."""
    return {name: mcmc.load_component(SPURIOUS / f) for name, f in FILES.items()}


def _rows(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} question {i}?", "correct": f"{tag}-yes", "incorrect": f"{tag}-no"} for i in range(n)]


def test_combinations_match_the_paper_figure():
    assert len(mcmc.COMBINATIONS) == 16 and len(set(mcmc.COMBINATIONS)) == 16
    assert mcmc.COMBINATIONS[0] == ("verbs", "sentiment", 1) and mcmc.COMBINATIONS[-1] == ("pronouns", "verbs", 1)
    # 8 (pair, intended question) settings, each in both orders: (a, b, i) comes with (b, a, 1 - i)
    assert all((b, a, 1 - i) in mcmc.COMBINATIONS for a, b, i in mcmc.COMBINATIONS)
    assert len({(frozenset((a, b)), (a, b)[i]) for a, b, i in mcmc.COMBINATIONS}) == 8
    assert set(mcmc.HUB_IDS) == set(mcmc.COMPONENTS)


def test_load_component_reads_the_raw_csvs(real):
    assert {k: len(v) for k, v in real.items()} == {"verbs": 4032, "sentiment": 1167, "sports": 1000, "pronouns": 2002}
    assert real["sports"][0] == {
        "question": "Terry Bradshaw is known for playing",
        "correct": "football",
        "incorrect": "basketball",
    }  # the extra athlete / index columns are dropped


@pytest.mark.parametrize(
    "a, b, intended, sizes",
    [
        ("verbs", "sentiment", 1, (816, 175, 176)),
        ("sports", "pronouns", 0, (700, 150, 150)),
        ("pronouns", "verbs", 1, (1400, 300, 300)),
    ],
)
def test_split_sizes_ambiguity_and_template_on_real_data(real, a, b, intended, sizes):
    splits = mcmc.build_mcmc(real[a], real[b], intended)
    assert tuple(len(splits[s]) for s in mcmc.SPLITS) == sizes
    by_q_a = {r["question"]: r for r in real[a]}
    by_q_b = {r["question"]: r for r in real[b]}
    for name, items in splits.items():
        for item in items:
            assert item["split"] == name
            assert item["ambiguous"] == (name != "test")  # 100% ambiguous train/val, 0% ambiguous test
            assert (item["answer_a"] == item["answer_b"]) == item["ambiguous"]
            assert {item["target"], item["other"]} == {" A", " B"}
            assert item["target"] == (item["answer_a"], item["answer_b"])[intended]
            ra, rb = by_q_a[item["question_a"]], by_q_b[item["question_b"]]
            assert item["intended_answer"] == (ra["correct"], rb["correct"])[intended]
            assert item["spurious_answer"] == (ra["correct"], rb["correct"])[1 - intended]
            concepts = (mcmc.answer_concept(ra), mcmc.answer_concept(rb))
            assert (item["intended_label"], item["spurious_label"]) == (concepts[intended], concepts[1 - intended])
            # the option of answer_a's letter starts with a's correct answer; answer_b's ends with b's
            options = {" A": None, " B": None}
            lines = item["prompt"].split("\n")
            assert len(lines) == 4 and lines[0] == f"Question: {ra['question']} | {rb['question']}"
            assert lines[1].startswith("A. ") and lines[2].startswith("B. ") and lines[3] == "Answer:"
            options[" A"], options[" B"] = lines[1][3:], lines[2][3:]
            other_a = " B" if item["answer_a"] == " A" else " A"
            other_b = " B" if item["answer_b"] == " A" else " A"
            b_answer_under_a = rb["correct"] if item["ambiguous"] else rb["incorrect"]
            b_answer_under_other_a = rb["incorrect"] if item["ambiguous"] else rb["correct"]
            assert options[item["answer_a"]] == f"{ra['correct']}, {b_answer_under_a}"
            assert options[other_a] == f"{ra['incorrect']}, {b_answer_under_other_a}"
            assert options[item["answer_b"]].endswith(f", {rb['correct']}")
            assert options[other_b].endswith(f", {rb['incorrect']}")


def test_answer_concepts_are_the_question_classes(real):
    """Verbs answers are classed by the subject's number, the rest by the answer; real data and generators agree."""
    from caft_jax.tasks.generators import GENERATORS

    plural = {"are", "have", "do", "go"}
    expected = {
        "verbs": {"singular", "plural"},
        "sentiment": {"positive", "negative"},
        "pronouns": {"he", "she", "they"},
        "sports": {"baseball", "basketball", "football"},
    }
    offline = {name: make(seed=0) for name, make in GENERATORS.items()}
    for source in (real, offline):
        for name, rows in source.items():
            concepts = [mcmc.answer_concept(r) for r in rows]
            assert set(concepts) == expected[name], name
        verbs = source["verbs"]
        assert all(mcmc.answer_concept(r) == ("plural" if r["correct"] in plural else "singular") for r in verbs)
        assert abs(sum(r["correct"] in plural for r in verbs) / len(verbs) - 0.5) < 0.05
    # a verb pair outside the agreement table keeps its answer as the class
    assert mcmc.answer_concept({"question": "q", "correct": "was", "incorrect": "is"}) == "was"
    assert mcmc.answer_concept({"question": "q", "correct": "is", "incorrect": "has"}) == "is"


def test_repeated_questions_are_dropped_entirely(real):
    splits = mcmc.build_mcmc(real["pronouns"], real["verbs"], 0)
    seen = [it["question_a"] for items in splits.values() for it in items]
    assert len(seen) == 2000 == len(set(seen)) and DUPLICATED not in seen  # 2,002 rows, one question twice
    rows = _rows(10, "a")
    rows.append(dict(rows[3]))  # both copies of a repeated question go, not just the second one
    splits = mcmc.build_mcmc(rows, _rows(20, "b"), 0)
    questions = [it["question_a"] for items in splits.values() for it in items]
    assert len(questions) == 9 and rows[3]["question"] not in questions


def test_exact_prompt_for_one_item():
    a = {"question": "Is it?", "correct": "yes", "incorrect": "no"}
    b = {"question": "How?", "correct": "well", "incorrect": "badly"}
    amb = mcmc.make_item(a, b, 1, ambiguous=True, swap=False, split="train")
    assert amb["prompt"] == "Question: Is it? | How?\nA. yes, well\nB. no, badly\nAnswer:"
    assert (amb["target"], amb["other"], amb["answer_a"], amb["answer_b"]) == (" A", " B", " A", " A")
    test = mcmc.make_item(a, b, 1, ambiguous=False, swap=True, split="test")
    assert test["prompt"] == "Question: Is it? | How?\nA. no, well\nB. yes, badly\nAnswer:"
    assert (test["target"], test["other"], test["answer_a"], test["answer_b"]) == (" A", " B", " B", " A")
    assert (test["intended_label"], test["spurious_label"]) == ("well", "yes")


def test_half_of_each_split_is_swapped_and_the_build_is_deterministic(real):
    splits = mcmc.build_mcmc(real["verbs"], real["sentiment"], 1)
    for items in splits.values():
        n_a = sum(it["answer_a"] == " A" for it in items)
        assert n_a == len(items) - len(items) // 2  # exactly len // 2 swapped
    again = mcmc.build_mcmc(real["verbs"], real["sentiment"], 1)
    assert again == splits
    other = mcmc.build_mcmc(real["verbs"], real["sentiment"], 1, seed=7)
    assert [it["prompt"] for it in other["train"]] != [it["prompt"] for it in splits["train"]]


def test_intended_only_moves_the_target(real):
    s0 = mcmc.build_mcmc(real["sentiment"], real["verbs"], 0)
    s1 = mcmc.build_mcmc(real["sentiment"], real["verbs"], 1)
    for name in mcmc.SPLITS:
        assert [it["prompt"] for it in s0[name]] == [it["prompt"] for it in s1[name]]
    assert [it["target"] for it in s0["train"]] == [it["target"] for it in s1["train"]]  # ambiguous: same labels
    for i0, i1 in zip(s0["test"], s1["test"], strict=True):
        assert i0["target"] == i1["other"] and i0["target"] == i0["answer_a"] and i1["target"] == i1["answer_b"]
        assert (i0["intended_label"], i0["spurious_label"]) == (i1["spurious_label"], i1["intended_label"])
        assert i0["intended_label"] in ("positive", "negative")


def test_ambiguous_items_are_the_first_of_a_split():
    splits = mcmc.build_mcmc(_rows(100, "a"), _rows(100, "b"), 0, train_ambiguous_frac=0.5, test_ambiguous_frac=0.2)
    assert [it["ambiguous"] for it in splits["train"]] == [True] * 35 + [False] * 35
    assert [it["ambiguous"] for it in splits["val"]] == [True] * 8 + [False] * 7
    assert [it["ambiguous"] for it in splits["test"]] == [True] * 3 + [False] * 12


def test_contamination_check_raises_on_overlap():
    items = mcmc.build_mcmc(_rows(20, "a"), _rows(20, "b"), 0)
    mcmc.check_contamination(items)
    planted = {**items, "test": items["test"] + [dict(items["train"][0], split="test")]}
    with pytest.raises(DataError, match="both the train and the test split"):
        mcmc.check_contamination(planted)


def test_bad_settings_and_tiny_inputs_raise():
    with pytest.raises(ConfigError, match="intended must be 0"):
        mcmc.build_mcmc(_rows(20, "a"), _rows(20, "b"), 2)
    with pytest.raises(ConfigError, match="train_ambiguous_frac"):
        mcmc.build_mcmc(_rows(20, "a"), _rows(20, "b"), 0, train_ambiguous_frac=1.5)
    with pytest.raises(DataError, match="only 2 question pairs"):
        mcmc.build_mcmc(_rows(2, "a"), _rows(20, "b"), 0)
    with pytest.raises(DataError, match="rows_b item 1: missing column 'correct'"):
        mcmc.build_mcmc(_rows(5, "a"), [_rows(1, "b")[0], {"question": "q", "incorrect": "x"}], 0)


def test_malformed_files_raise_data_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,correct\nIs it?,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv: missing column 'incorrect'"):
        mcmc.load_component(bad)
    empty_cell = tmp_path / "cell.csv"
    empty_cell.write_text("question,correct,incorrect\nIs it?,yes,no\nHow?,,badly\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cell\.csv line 3: 'correct' is empty"):
        mcmc.load_component(empty_cell)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"question": "Is it?", "correct": "yes", "incorrect": "no"}\n{"question": "How?"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl line 2: missing column 'correct'"):
        mcmc.load_component(jsonl)
    with pytest.raises(DataError, match="file not found"):
        mcmc.load_component(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="unknown component 'colours'"):
        mcmc.load_component("colours")
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeffquestion,correct,incorrect\nIs it?,yes,no\n", encoding="utf-8")
    assert mcmc.load_component(bom) == [{"question": "Is it?", "correct": "yes", "incorrect": "no"}]


def test_hub_loading_without_network_says_what_to_do(monkeypatch):
    def offline(hub_id, split):
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="kh4dien/mc-sentiment.*local CSV path.*offline generators"):
        mcmc.load_component("sentiment")

    class Rows(list):
        column_names = ["question", "correct", "incorrect", "athlete"]

    loaded = Rows([{"question": "X is known for playing", "correct": "golf", "incorrect": "chess", "athlete": "X"}])
    calls = []
    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda h, split: calls.append(h) or loaded)
    )
    assert mcmc.load_component("sports") == [
        {"question": "X is known for playing", "correct": "golf", "incorrect": "chess"}
    ]
    assert calls == ["hc-mats/sports-gemma-2-2b-top-1000"]


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_mcmc_writes_splits_and_task_json(tmp_path):
    out = tmp_path / "vs"
    argv = ["mcmc", "--a", "verbs", "--b", "sentiment", "--intended", "1", "--out", str(out)]
    argv += ["--source-a", str(SPURIOUS / "sva.csv"), "--source-b", str(SPURIOUS / "sentiment.csv")]
    assert cli.main(argv) == 0
    sizes = {name: len(load_mc_jsonl(out / f"{name}.jsonl")) for name in mcmc.SPLITS}
    assert sizes == {"train": 816, "val": 175, "test": 176}
    task = json.loads((out / "task.json").read_text())
    assert task["sizes"] == sizes and task["intended_question"] == "sentiment" and task["in_paper_figure"]
    test_items = load_mc_jsonl(out / "test.jsonl")
    assert all(it["target"] == it["answer_b"] != it["answer_a"] for it in test_items)


def test_cli_offline_generators_and_sports_error(tmp_path, capsys):
    out = tmp_path / "pv"
    assert cli.main(["mcmc", "--a", "pronouns", "--b", "verbs", "--intended", "1", "--offline", "--out", str(out)]) == 0
    assert json.loads((out / "task.json").read_text())["sizes"] == {"train": 1400, "val": 300, "test": 300}
    code = cli.main(["mcmc", "--a", "sports", "--b", "verbs", "--intended", "0", "--offline", "--out", str(out)])
    assert code == 2 and "pass --source-a PATH" in capsys.readouterr().err


def test_cli_list_prints_the_16_combinations(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 17 and lines[1].split()[:4] == ["1", "verbs", "sentiment", "1"]
