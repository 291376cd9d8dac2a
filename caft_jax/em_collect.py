"""Sampling and judging of free-form answers with resume: the work list, the logs on disk and `collect`.

Answers are produced by a *sampler*: ``sampler(batch, *, seed) -> list[str | dict]``, where batch is a list of
chat message lists (``[{"role": "system"|"user", "content": str}, ...]``), `seed` an int that differs from chunk
to chunk (derived from the chunk's first (question, sample), so a resumed run does not replay earlier random
streams), and a dict result carries ``"text"`` (and optionally ``"finish_reason"``).

Each answer is judged once per judge prompt of its question with the authors' judge call (`JUDGE_KWARGS`: one
completion token, temperature 0, top_logprobs 20, seed 0, score = `score_0_100`), or, with ``scoring="text"``,
with a greedy answer of a few tokens whose leading number is the score (`score_text_0_100`: for judges whose
tokenizer splits numbers into digits).

Resume: answers go to ``answers.jsonl`` chunk by chunk as they are sampled and judge scores to ``scores.jsonl`` as
each judge call returns, while judging overlaps sampling. A rerun with the same ``out_dir`` reads both files and
only samples / judges what is missing, so an interrupted run loses at most the chunk being sampled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from caft_jax.em_questions import Question
from caft_jax.errors import CaftError
from caft_jax.llm_client import SCORE_FORMS, ChatClient, JudgeError

log = logging.getLogger(__name__)

__all__ = ["WorkItem", "work_items", "collect", "Sampler", "JUDGE_KWARGS"]

#: the authors' judge call: one token, greedy, 20 top logprobs, seed 0
JUDGE_KWARGS = SCORE_FORMS["logprob"][0]

Sampler = Callable[..., list[Any]]  # sampler(batch: list[list[dict]], *, seed: int) -> list[str | dict]


# ---------------------------------------------------------------------------------------------------- work items


@dataclasses.dataclass(frozen=True)
class WorkItem:
    question_id: str
    sample_index: int
    paraphrase_index: int
    question: str  # the paraphrase text the judge sees as {question}
    messages: tuple  # what the sampler sees
    judge_prompts: Mapping[str, str]


def work_items(questions: Sequence[Question], samples: int | None = None, use_system: bool = True) -> list[WorkItem]:
    """All (question, sample) pairs; sample i uses paraphrase i mod P (deterministic, so a rerun matches)."""
    items = []
    for q in questions:
        for i in range(q.n_samples(samples)):
            pi = i % len(q.paraphrases)
            items.append(
                WorkItem(q.id, i, pi, q.paraphrases[pi], tuple(q.messages(pi, use_system)), dict(q.judge_prompts))
            )
    return items


def _chunk_seed(item: WorkItem) -> int:
    digest = hashlib.sha256(f"{item.question_id}\0{item.sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _prompt_sha(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


def _score_key(qid: str, idx: int, metric: str, template: str, judge: str) -> tuple:
    """The identity of one judgement: (question, sample, metric, judge model, prompt hash)."""
    return (qid, idx, metric, judge, _prompt_sha(template))


# ---------------------------------------------------------------------------------------------------- logs on disk


class _JsonlLog:
    """Append-only JSONL of records; a line cut by a killed writer is skipped when read and fenced off on append."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: skipping a truncated line (an interrupted write)", self.path)
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def append(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    needs_newline = r.read(1) != b"\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(("\n" if needs_newline else "") + text)
                f.flush()
                os.fsync(f.fileno())


def _saved_answers(answers_log: _JsonlLog, items: Sequence[WorkItem]) -> dict[tuple[str, int], dict]:
    """{(question_id, sample_index): answer record} from an earlier run; refuses answers to a changed question."""
    answers: dict[tuple[str, int], dict] = {}
    for rec in answers_log.read():
        try:
            answers[(rec["question_id"], int(rec["sample_index"]))] = rec
        except (KeyError, TypeError, ValueError):
            continue
    by_key = {(it.question_id, it.sample_index): it for it in items}
    for key, rec in answers.items():
        it = by_key.get(key)
        if it is not None and rec.get("question") != it.question:
            raise CaftError(
                f"{answers_log.path} holds an answer to a different text for question {key[0]!r}; "
                "use a fresh --out-dir for a changed question file."
            )
    return answers


def _saved_scores(scores_log: _JsonlLog) -> dict[tuple, dict]:
    """{score key: score record} from an earlier run (see `_score_key`)."""
    scores: dict[tuple, dict] = {}
    for rec in scores_log.read():
        try:
            scores[(rec["question_id"], int(rec["sample_index"]), rec["metric"], rec["judge"], rec["prompt_sha"])] = rec
        except (KeyError, TypeError, ValueError):
            continue
    return scores


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------- judging


class _Judging:
    """Judge calls on `client`'s concurrency in background threads, each score saved to `scores_log` as it returns.

    After one judge call fails for good no more calls are submitted (answers still get sampled); the failures are
    reported by `raise_failures` once the pool is shut down.
    """

    def __init__(
        self,
        client: ChatClient,
        scores_log: _JsonlLog,
        scores: dict[tuple, dict],
        items: Sequence[WorkItem],
        progress: bool,
        scoring: str = "logprob",
    ):
        if scoring not in SCORE_FORMS:
            raise CaftError(f"Unknown judge scoring {scoring!r}; choose one of {sorted(SCORE_FORMS)}.")
        self.client, self.scores_log, self.scores = client, scores_log, scores
        self.request_kwargs, self.read_score = SCORE_FORMS[scoring]
        # scores of the two forms are different measurements: they are saved (and resumed) under different names
        self.judge = client.model if scoring == "logprob" else f"{client.model} (text score)"
        self.lock = threading.Lock()
        self.failures: list[BaseException] = []
        self.broken = threading.Event()
        self.n_judgements = sum(len(it.judge_prompts) for it in items)
        self.bar = _progress(self.n_judgements, "judge", progress, initial=self.n_done(items))
        self.pool = ThreadPoolExecutor(max_workers=client.max_concurrency, thread_name_prefix="judge")

    def key(self, it: WorkItem, metric: str, template: str) -> tuple:
        return _score_key(it.question_id, it.sample_index, metric, template, self.judge)

    def n_done(self, items: Sequence[WorkItem]) -> int:
        """How many judgements of `items` have a saved score."""
        return sum(1 for it in items for m, t in it.judge_prompts.items() if self.key(it, m, t) in self.scores)

    def submit(self, it: WorkItem, answer_rec: dict) -> None:
        """Queue the judgements of one answer that have no score yet."""
        for metric, template in it.judge_prompts.items():
            if self.key(it, metric, template) not in self.scores and not self.broken.is_set():
                self.pool.submit(self._judge_one, it, answer_rec["answer"], metric, template)

    def _judge_one(self, it: WorkItem, answer: str, metric: str, template: str) -> None:
        if self.broken.is_set():
            return
        prompt = template.format(question=it.question, answer=answer)
        try:
            res = self.client.complete([{"role": "user", "content": prompt}], **self.request_kwargs)
        except Exception as e:  # noqa: BLE001 - reported after the run, the rest keeps going
            with self.lock:
                self.failures.append(e)
            self.broken.set()
            return
        rec = {
            "question_id": it.question_id,
            "sample_index": it.sample_index,
            "metric": metric,
            "score": self.read_score(res),
            "content": res["content"],
            "judge": self.judge,
            "prompt_sha": _prompt_sha(template),
        }
        self.scores_log.append([rec])
        with self.lock:
            self.scores[self.key(it, metric, template)] = rec
            if self.bar is not None:
                self.bar.update(1)

    def cancel(self) -> None:
        """Wait for the judgements in flight (they are saved) and drop the queued ones."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Wait for every submitted judgement."""
        self.pool.shutdown(wait=True)
        if self.bar is not None:
            self.bar.close()

    def raise_failures(self, items: Sequence[WorkItem]) -> None:
        """Re-raise a non-CAFT failure as is; otherwise raise `JudgeError` counting the missing judgements."""
        if not self.failures:
            return
        if not isinstance(self.failures[0], CaftError):
            raise self.failures[0]
        missing = self.n_judgements - self.n_done(items)
        raise JudgeError(
            f"{missing} of {self.n_judgements} judgements are missing because the judge failed ({self.failures[0]}); "
            "all answers and finished scores are saved, so rerun the same command to finish."
        )


# ---------------------------------------------------------------------------------------------------- sampling


def _answer_records(chunk: Sequence[WorkItem], outs: Sequence[Any]) -> list[dict]:
    """One answer record per item of a sampled chunk (``outs``: the sampler's str or dict results)."""
    if len(outs) != len(chunk):
        raise CaftError(f"The sampler returned {len(outs)} answers for {len(chunk)} prompts.")
    recs = []
    for it, o in zip(chunk, outs, strict=True):
        text = o.get("text", "") if isinstance(o, Mapping) else str(o)
        rec = {
            "question_id": it.question_id,
            "sample_index": it.sample_index,
            "paraphrase_index": it.paraphrase_index,
            "question": it.question,
            "messages": [dict(m) for m in it.messages],
            "answer": text,
            "finish_reason": o.get("finish_reason") if isinstance(o, Mapping) else None,
        }
        recs.append(rec)
    return recs


def _sample_missing(
    todo: Sequence[WorkItem],
    sampler: Sampler,
    chunk_size: int,
    answers_log: _JsonlLog,
    answers: dict[tuple[str, int], dict],
    judging: _Judging,
    bar,
) -> None:
    """Sample `todo` chunk by chunk; save each chunk's answers, then queue their judgements."""
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        seed = _chunk_seed(chunk[0])
        outs = sampler([[dict(m) for m in it.messages] for it in chunk], seed=seed)
        recs = _answer_records(chunk, outs)
        answers_log.append(recs)
        for it, rec in zip(chunk, recs, strict=True):
            answers[(it.question_id, it.sample_index)] = rec
            judging.submit(it, rec)
        if bar is not None:
            bar.update(len(chunk))


def _merged(items: Sequence[WorkItem], answers: Mapping, judging: _Judging) -> list[dict]:
    """Per item, its answer record plus ``{metric: score}`` and ``{metric}_content`` for each judge prompt."""
    merged = []
    for it in items:
        rec = dict(answers[(it.question_id, it.sample_index)])
        for metric, template in it.judge_prompts.items():
            s = judging.scores[judging.key(it, metric, template)]
            rec[metric] = s["score"]
            rec[f"{metric}_content"] = s["content"]
        merged.append(rec)
    return merged


# ---------------------------------------------------------------------------------------------------- the run


def collect(
    items: Sequence[WorkItem],
    sampler: Sampler,
    client: ChatClient,
    out_dir: str | os.PathLike,
    *,
    chunk_size: int = 32,
    progress: bool = True,
    scoring: str = "logprob",
) -> list[dict]:
    """Sample the missing answers and judge the missing scores of `items`, resuming from `out_dir`.

    Writes ``answers.jsonl`` (one record per answer, after each sampled chunk) and ``scores.jsonl`` (one record per
    judgement, as each returns). Judging runs on `client`'s concurrency in the background while sampling goes on.
    Returns one merged record per item, in item order: the answer record plus ``{metric: score}`` for each judge
    prompt and ``{metric}_content`` (the judge's top token, e.g. "REFUSAL").

    Raises whatever the sampler raises (after the judgements in flight are saved), or `JudgeError` when some
    judge calls failed for good (the rest is saved; rerun to retry them).
    """
    if chunk_size < 1:
        raise CaftError(f"chunk_size must be at least 1, got {chunk_size}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    answers_log = _JsonlLog(out / "answers.jsonl")
    scores_log = _JsonlLog(out / "scores.jsonl")
    answers = _saved_answers(answers_log, items)
    judging = _Judging(client, scores_log, _saved_scores(scores_log), items, progress, scoring)

    todo = [it for it in items if (it.question_id, it.sample_index) not in answers]
    sample_bar = _progress(len(items), "sample", progress, initial=len(items) - len(todo))
    try:
        for it in items:  # judge what earlier runs sampled but did not judge
            rec = answers.get((it.question_id, it.sample_index))
            if rec is not None:
                judging.submit(it, rec)
        _sample_missing(todo, sampler, chunk_size, answers_log, answers, judging, sample_bar)
    except BaseException:
        judging.cancel()  # judgements in flight are saved, queued ones are dropped
        raise
    finally:
        if sample_bar is not None:
            sample_bar.close()
        judging.close()

    judging.raise_failures(items)
    return _merged(items, answers, judging)
