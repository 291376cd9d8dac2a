"""LLM autointerp of feature displays (caft_method.md 2.5): an explainer model describes each side of a feature
from its top contexts, then rates the description's relevance to the concept to remove 0-100; the features at or
above a threshold become a selection. The explainer is any OpenAI-compatible endpoint (``llm_client.ChatClient``),
e.g. `caft serve` with a local model."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from caft_jax.discovery.display_report import Context, FeatureDisplay
from caft_jax.discovery.select import Selection, SelectionError, from_selection_file, jsonable

DEFAULT_AUTOINTERP_MODEL = "gpt-4.1-mini"

EXPLAIN_SYSTEM = (
    "You are a meticulous interpretability researcher. You will see text excerpts in which one feature of a "
    "language model's internal activations is strongly active. The token where it is most active is marked "
    "<<like this>>, and the number before each excerpt is the activation there. Describe concisely, in one or two "
    "sentences, what the feature responds to (a concept, topic, token type, or pattern). Reply with the "
    "description only."
)
SCORE_SYSTEM = (
    "You rate how relevant a language-model feature is to a concept we want to remove from the model. "
    "Reply with a single integer from 0 (unrelated) to 100 (exactly this concept), and nothing else."
)


def autointerp_client(
    base_url: str | None = None,
    model: str | None = None,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    cache_path: str | os.PathLike | None = None,
    **kwargs,
):
    """A ``ChatClient`` for autointerp from arguments or the environment.

    base_url: argument, else $CAFT_AUTOINTERP_BASE_URL, else $OPENAI_BASE_URL, else OpenAI's default.
    model: argument, else $CAFT_AUTOINTERP_MODEL, else gpt-4.1-mini (the authors' explainer for PCs).
    The key is read from the environment variable named ``api_key_env`` (it is never an argument).
    """
    from caft_jax.llm_client import ChatClient

    base_url = base_url or os.environ.get("CAFT_AUTOINTERP_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    model = model or os.environ.get("CAFT_AUTOINTERP_MODEL") or DEFAULT_AUTOINTERP_MODEL
    return ChatClient(base_url, model, api_key=os.environ.get(api_key_env, ""), cache_path=cache_path, **kwargs)


def _format_context(ctx: Context) -> str:
    parts = [f"<<{t}>>" if j == ctx.peak else t for j, t in enumerate(ctx.tokens)]
    return f"{ctx.peak_value:.3g}: " + "".join(parts).replace("\n", "\\n")


def explain_messages(feature: FeatureDisplay, sign: str, n_examples: int = 10) -> list[dict]:
    """Chat messages asking for an explanation of one side ("+" max, "-" min) of a feature's displays."""
    contexts = feature.max_contexts if sign == "+" else feature.min_contexts
    side = "most positive" if sign == "+" else "most negative"
    examples = "\n".join(f"{i + 1}. {_format_context(c)}" for i, c in enumerate(contexts[:n_examples]))
    user = f"Excerpts where the feature's value is {side}:\n{examples}\n\nWhat does this feature respond to?"
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def score_messages(explanation: str, rubric: str) -> list[dict]:
    """Chat messages asking for a 0-100 relevance rating of an explanation against the task rubric."""
    user = (
        f"Concept to remove:\n{rubric}\n\nFeature explanation:\n{explanation}\n\n"
        "How relevant is this feature to the concept to remove? Answer with one integer from 0 to 100."
    )
    return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]


def _parse_score(content: str) -> float | None:
    match = re.search(r"\d+(?:\.\d+)?", content or "")
    if match is None:
        return None
    value = float(match.group())
    return value if 0 <= value <= 100 else None


def autointerp_scores(
    features: Sequence[FeatureDisplay],
    rubric: str,
    client,
    *,
    n_examples: int = 10,
    explain_max_tokens: int = 200,
    top_logprobs: int = 20,
    progress: bool = False,
    scoring: str = "logprob",
) -> list[dict]:
    """Explain each feature side from its displays, then rate its relevance to ``rubric`` 0-100.

    Each side with contexts (max "+" and, for PCs, min "-") is explained separately, as the authors do. The score
    is the probability-weighted mean over number tokens of the first answer token (``score_0_100``), or, when the
    endpoint returns no usable logprobs, the number in the answer text; with ``scoring="text"`` the number the
    explainer writes (for explainers whose tokenizer splits numbers into digits, e.g. SmolLM2 behind `caft serve`).

    Args:
      features: displays (``top_contexts`` output or ``load_display_json``).
      rubric: the task's description of the unwanted concept (the authors' "pointers").
      client: a ``ChatClient`` (see ``autointerp_client``).
    Returns:
      [{"layer", "index", "sign", "explanation", "score" (float or None)}] per feature side.
    """
    from caft_jax.llm_client import SCORE_FORMS, score_0_100

    if scoring not in SCORE_FORMS:
        raise SelectionError(f"unknown autointerp scoring {scoring!r}; choose one of {sorted(SCORE_FORMS)}.")
    if not rubric.strip():
        raise SelectionError("the autointerp rubric is empty; describe the concept to remove.")
    sides = [(f, s) for f in features for s, ctxs in (("+", f.max_contexts), ("-", f.min_contexts)) if ctxs]
    explain = [{"messages": explain_messages(f, s, n_examples), "max_tokens": explain_max_tokens} for f, s in sides]
    explanations = [r["content"].strip() for r in client.complete_many(explain, progress=progress, desc="explain")]
    if scoring == "logprob":
        score_kwargs = {"max_tokens": 1, "logprobs": True, "top_logprobs": top_logprobs}
    else:
        score_kwargs = dict(SCORE_FORMS[scoring][0])
    score = [{"messages": score_messages(e, rubric), **score_kwargs} for e in explanations]
    records = []
    for (f, s), explanation, answer in zip(
        sides, explanations, client.complete_many(score, progress=progress, desc="score"), strict=True
    ):
        value = score_0_100(answer.get("top_logprobs")) if scoring == "logprob" else SCORE_FORMS[scoring][1](answer)
        if value is None and scoring == "logprob":
            value = _parse_score(answer.get("content", ""))
        records.append({"layer": f.layer, "index": f.index, "sign": s, "explanation": explanation, "score": value})
    return records


def from_autointerp(
    pca_or_sae, records: Sequence[Mapping], *, threshold: float = 70.0, rubric: str | None = None, model: str = ""
) -> Selection:
    """Keep features with a side scoring >= ``threshold`` (the authors use 70 or 90); metadata keeps every record."""
    best: dict[tuple[int, int], float] = {}
    for r in records:
        if r.get("score") is not None:
            key = (int(r["layer"]), int(r["index"]))
            best[key] = max(best.get(key, -1.0), float(r["score"]))
    ids: dict[int, list[int]] = {}
    for (layer, index), value in sorted(best.items()):
        if value >= threshold:
            ids.setdefault(layer, []).append(index)
    meta = {"source": "autointerp", "threshold": threshold, "rubric": rubric, "model": model, "records": list(records)}
    chosen = from_selection_file(pca_or_sae, ids)
    chosen.metadata = jsonable(meta)
    return chosen
