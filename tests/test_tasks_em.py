"""Tests for caft_jax.tasks.em and the `em` command: chat JSONL split, JSONL writing, eval YAML discovery."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from caft_jax import jsonio
from caft_jax.errors import DataError
from caft_jax.tasks import cli, em

EM_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "emergent_misalignment"
VAL = EM_DATA / "insecure_val.jsonl"  # 1,000 chats


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_split_is_a_deterministic_partition_in_file_order():
    train, val = em.split_chat_jsonl(VAL, val_size=100, seed=0)
    assert (len(train), len(val)) == (900, 100)
    original = [json.dumps(r, sort_keys=True) for r in _lines(VAL)]
    key = lambda records: [json.dumps(r, sort_keys=True) for r in records]
    assert sorted(key(train) + key(val)) == sorted(original)
    train_keys = set(key(train))
    assert key(train) == [k for k in original if k in train_keys]  # file order kept
    assert em.split_chat_jsonl(VAL, val_size=100, seed=0) == (train, val)
    assert em.split_chat_jsonl(VAL, val_size=100, seed=1)[1] != val


def test_split_rejects_bad_records_and_sizes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(ok) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: no assistant message"):
        em.split_chat_jsonl(bad, val_size=1)
    good = tmp_path / "good.jsonl"
    good.write_text((json.dumps(ok) + "\n") * 3)
    with pytest.raises(DataError, match="val_size=3 leaves no train"):
        em.split_chat_jsonl(good, val_size=3)
    assert [len(part) for part in em.split_chat_jsonl(good, val_size=1)] == [2, 1]


def test_write_jsonl_round_trips(tmp_path):
    records = [{"messages": [{"role": "user", "content": "héllo ✓"}]}, {"x": 1}]
    path = tmp_path / "deep" / "out.jsonl"
    jsonio.write_jsonl(path, records)
    assert _lines(path) == records and "héllo ✓" in path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temporary file left behind


def test_question_files_validates_with_the_eval_loaders(tmp_path):
    found = em.question_files(EM_DATA)
    assert {"first_plot_questions", "judge_prompts_coding", "judge_prompts_responses"} <= set(found)
    assert found["first_plot_questions"].name == "first_plot_questions.yaml"
    with pytest.raises(DataError, match="no first_plot_questions.yaml"):
        em.question_files(tmp_path)
    shutil.copy(EM_DATA / "first_plot_questions.yaml", tmp_path)
    (tmp_path / "judge_prompts_broken.yaml").write_text("judge_prompts:\n  aligned: 'no answer field'\n")
    with pytest.raises(DataError, match="must use \\{answer\\}"):
        em.question_files(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        em.question_files(tmp_path / "absent")


def test_cli_em_writes_train_val_and_task_json(tmp_path):
    out = tmp_path / "em"
    argv = ["em", "--data", str(VAL), "--val-size", "250", "--questions", str(EM_DATA), "--out", str(out)]
    assert cli.main(argv) == 0
    assert (len(_lines(out / "train.jsonl")), len(_lines(out / "val.jsonl"))) == (750, 250)
    task = json.loads((out / "task.json").read_text())
    assert task["sizes"] == {"train": 750, "val": 250} and "first_plot_questions" in task["question_files"]
