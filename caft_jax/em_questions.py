"""Emergent-misalignment eval inputs: question YAMLs, judge-prompt YAMLs and coding-prompt JSONL files.

The formats are the authors' (caft_method.md §3.1): ``first_plot_questions.yaml`` is a YAML list of question
entries, ``judge_prompts_*.yaml`` map judge-prompt names to templates (optionally under ``judge_prompts``), and
``insecure_val.jsonl`` holds chats whose first user message is a coding prompt. Every YAML mapping is strict: a key
the loader does not read raises `ConfigError` instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caft_jax.errors import ConfigError, DataError

__all__ = [
    "Question",
    "QUESTION_KEYS",
    "JUDGE_FILE_KEYS",
    "SUPPORTED_TYPES",
    "load_questions",
    "load_judge_prompts",
    "load_code_prompts",
    "code_questions",
]

SUPPORTED_TYPES = ("free_form", "free_form_judge", "free_form_judge_0_100")
#: the keys a question entry may have (the first three are required)
QUESTION_KEYS = ("id", "paraphrases", "judge_prompts", "type", "system", "samples_per_paraphrase", "judge")
#: the top-level keys of a judge-prompt file in its wrapped form ``{judge_prompts: {name: template}}``
JUDGE_FILE_KEYS = ("judge_prompts",)


@dataclasses.dataclass(frozen=True)
class Question:
    """One evaluation question: its paraphrases, optional system prompt and judge prompt templates."""

    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: Mapping[str, str]
    type: str = "free_form_judge_0_100"
    system: str | None = None
    samples_per_paraphrase: int = 100
    judge: str | None = None

    def n_samples(self, samples: int | None = None) -> int:
        """Answers to draw: `samples` if given, else samples_per_paraphrase × number of paraphrases."""
        return int(samples) if samples is not None else self.samples_per_paraphrase * len(self.paraphrases)

    def messages(self, paraphrase_index: int, use_system: bool = True) -> list[dict]:
        msgs = []
        if use_system and self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": self.paraphrases[paraphrase_index]})
        return msgs


def _check_template(path: Any, name: str, template: Any) -> str:
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"{path}: judge prompt {name!r} must be a non-empty string.")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise DataError(f"{path}: judge prompt {name!r} is not a valid format string ({e}).") from None
    unknown = fields - {"question", "answer"}
    if unknown or "answer" not in fields:
        raise DataError(
            f"{path}: judge prompt {name!r} must use {{answer}} (and may use {{question}}) and no other fields, "
            f"found {sorted(fields)}."
        )
    return template


def _check_keys(path: Any, entry: str, mapping: Mapping, accepted: Sequence[str]) -> None:
    """Raise `ConfigError` naming the file, the entry, the unknown keys and the accepted ones."""
    unknown = sorted(str(k) for k in mapping if k not in accepted)
    if unknown:
        raise ConfigError(f"{path}: {entry} has unknown key(s) {unknown}; the accepted keys are {list(accepted)}.")


def _read_yaml(path: str | os.PathLike) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError(f"Question file {p} does not exist.")
    try:
        with open(p, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DataError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None


def _question(path: str | os.PathLike, i: int, q: Any, seen: set[str]) -> Question:
    """Entry ``i`` of a question file as a `Question` (``seen``: the ids of the entries before it, updated)."""
    if not isinstance(q, Mapping):
        raise DataError(f"{path}: entry {i} is not a mapping with id/paraphrases/judge_prompts.")
    qid = q.get("id")
    if not isinstance(qid, str) or not qid:
        raise DataError(f"{path}: entry {i} has no string 'id'.")
    _check_keys(path, f"question {qid!r}", q, QUESTION_KEYS)
    if qid in seen:
        raise DataError(f"{path}: question id {qid!r} appears twice.")
    seen.add(qid)
    qtype = q.get("type", "free_form_judge_0_100")
    if qtype not in SUPPORTED_TYPES:
        raise DataError(f"{path}: question {qid!r} has type {qtype!r}; supported types are {SUPPORTED_TYPES}.")
    paras = q.get("paraphrases")
    if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
        raise DataError(f"{path}: question {qid!r} needs 'paraphrases', a non-empty list of strings.")
    jp = q.get("judge_prompts")
    if not isinstance(jp, Mapping) or not jp:
        raise DataError(f"{path}: question {qid!r} needs 'judge_prompts', a mapping of name to template.")
    judge_prompts = {str(k): _check_template(f"{path}: question {qid!r}", k, v) for k, v in jp.items()}
    system = q.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{path}: question {qid!r} has a 'system' that is not a string.")
    spp = q.get("samples_per_paraphrase", 100)
    if not isinstance(spp, int) or spp < 1:
        raise DataError(f"{path}: question {qid!r} has samples_per_paraphrase {spp!r}; use a positive integer.")
    return Question(
        id=qid,
        paraphrases=tuple(paras),
        judge_prompts=judge_prompts,
        type=qtype,
        system=system or None,
        samples_per_paraphrase=spp,
        judge=q.get("judge"),
    )


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Questions from a YAML list in the ``first_plot_questions.yaml`` format (YAML anchors resolve as usual).

    Each entry needs ``id``, ``paraphrases`` (list of strings) and ``judge_prompts`` (name -> template with
    ``{question}`` / ``{answer}``); ``type`` (one of free_form, free_form_judge, free_form_judge_0_100),
    ``system`` (the ``*_json`` questions' system prompt), ``samples_per_paraphrase`` and ``judge`` are optional.
    Any other key raises `ConfigError`. ``*_template`` questions are ordinary questions whose paraphrase contains
    the template to fill.
    """
    data = _read_yaml(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path} must be a non-empty YAML list of questions.")
    seen: set[str] = set()
    return [_question(path, i, q, seen) for i, q in enumerate(data)]


def load_judge_prompts(path: str | os.PathLike) -> dict[str, str]:
    """Judge templates from a YAML mapping, either ``{judge_prompts: {name: template}}`` or ``{name: template}``.

    In the wrapped form ``judge_prompts`` is the only top-level key allowed (`ConfigError` otherwise).
    """
    data = _read_yaml(path)
    if isinstance(data, Mapping) and "judge_prompts" in data:
        _check_keys(path, "the top-level mapping", data, JUDGE_FILE_KEYS)
        data = data["judge_prompts"]
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{path} must map judge prompt names to templates (optionally under 'judge_prompts').")
    return {str(k): _check_template(path, k, v) for k, v in data.items()}


def load_code_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """User prompts of a chat JSONL such as ``insecure_val.jsonl`` (the first user message of each record)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Prompt file {p} does not exist.")
    prompts: list[str] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{p}:{n} is not valid JSON.") from None
            msgs = rec.get("messages") if isinstance(rec, Mapping) else None
            user = [m.get("content") for m in msgs or [] if isinstance(m, Mapping) and m.get("role") == "user"]
            if not user or not isinstance(user[0], str):
                raise DataError(f"{p}:{n} has no user message under 'messages'.")
            prompts.append(user[0])
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise DataError(f"{p} holds no prompts.")
    return prompts


def code_questions(prompts: Sequence[str], judge_prompts: Mapping[str, str]) -> list[Question]:
    """One single-sample `Question` per coding prompt (ids ``code_0000``, ...), judged with `judge_prompts`."""
    width = max(4, len(str(len(prompts) - 1)))
    return [
        Question(f"code_{i:0{width}d}", (p,), dict(judge_prompts), samples_per_paraphrase=1)
        for i, p in enumerate(prompts)
    ]
