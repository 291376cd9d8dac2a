"""OpenAI's request and response shapes for chat and text completions, and their mapping to generation rows.

The request models validate what the endpoints accept (ranges as OpenAI documents them) and refuse, with a
message, what they do not implement (tools, penalties, logit bias, echo, suffix), rather than ignoring it: a client
that asks for a penalty should learn it got none. Unknown extra fields are ignored, as OpenAI-compatible servers do,
so clients that send vendor fields keep working. Log-probabilities are those of the model's own distribution
(before temperature and top-p), as OpenAI reports them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from caft_jax.generate import MAX_TOP_LOGPROBS, Row, SamplingConfig

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, and the offending parameter."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ requests


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return stops

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; leave it at 0.", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server; leave it out.", param="logit_bias")

    def sampling(self, max_tokens: int) -> SamplingConfig:
        seed = self.seed if self.seed is not None else secrets.randbits(31)
        return SamplingConfig(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported.", param="messages")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream_options: dict[str, Any] | None = None
    tools: list | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported by this server.", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported.", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")

    def messages_for_template(self) -> list[dict]:
        """Messages as the chat template takes them ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server.", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server.", param="suffix")
        if self.best_of not in (None, 1, self.n):
            raise APIError(400, "best_of other than n is not supported by this server.", param="best_of")
        if self.stream:
            raise APIError(400, "streaming is supported for chat completions only.", param="stream")

    def prompts(self) -> list[str | list[int]]:
        """The prompt list: one string, several strings, one token list or several token lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty.", param="prompt")
        return list(p)


def job_rows(prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[Row]:
    """n rows per prompt; choice j of a request samples stream j, so a seeded request is reproducible."""
    return [Row(list(ids), sampling, stream=p * n + j) for p, ids in enumerate(prompt_ids) for j in range(n)]


# ------------------------------------------------------------------------------------------------ responses


def cut_at_stop(tokenizer, token_ids: list[int], finish_reason: str, stops: Sequence[str]) -> dict:
    """Text of one generated row, without its EOS and cut before the first stop sequence.

    Returns {"text", "token_ids" (the tokens the text came from; a token that straddles the stop string is kept),
    "finish_reason": "stop" | "length"}.
    """
    ids = token_ids[:-1] if finish_reason == "stop" else list(token_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return {"text": text, "token_ids": ids, "finish_reason": finish_reason}
    cut = min(hits)
    kept = len(ids)
    for m in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:m], skip_special_tokens=True)) >= cut:
            kept = m
            break
    return {"text": text[:cut], "token_ids": ids[:kept], "finish_reason": "stop"}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def logprob_entries(tokenizer, piece: dict, n_tokens: int, k: int) -> list[dict]:
    """OpenAI chat logprob entries of the first n_tokens of a piece {"token_ids", "logprobs", "top_ids",
    "top_logprobs"}: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""

    def entry(token_id, logprob):
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for i in range(n_tokens):
        item = entry(piece["token_ids"][i], piece["logprobs"][i])
        tops = zip(piece["top_ids"][i][:k], piece["top_logprobs"][i][:k], strict=True)
        item["top_logprobs"] = [entry(t, lp) for t, lp in tops]
        content.append(item)
    return content


def chat_logprobs(tokenizer, result: dict, n_tokens: int, k: int) -> dict:
    """OpenAI chat ``logprobs`` of a choice: {"content": [entry per token]}."""
    return {"content": logprob_entries(tokenizer, result, n_tokens, k)}


class StreamedChoice:
    """The text of one streamed choice as its tokens arrive: what may be sent now, and whether a stop sequence
    ended it.

    Text is held back while it could still be the start of a stop sequence (the longest stop's length - 1
    characters) or ends in an incomplete UTF-8 character, so what is sent is always a prefix of the final text.
    """

    def __init__(self, tokenizer, stops: Sequence[str], eos_ids: Sequence[int]):
        self.tokenizer, self.stops, self.eos_ids = tokenizer, list(stops), set(eos_ids)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop sequence appeared: the choice is complete

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text these tokens make sendable ("" once a stop sequence has ended the choice)."""
        if self.stopped:
            return ""
        self.ids += [t for t in token_ids if t not in self.eos_ids]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            safe = text[: min(hits)]
        else:
            safe = text[: len(text) - self.holdback] if self.holdback else text
            safe = safe.rstrip("\ufffd")
        if not safe.startswith(self.sent):  # decoding revised an earlier character: the rest is sent at the end
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        return new

    def rest(self, final_text: str) -> str:
        """What is left to send of the choice's final text."""
        return final_text[len(self.sent) :] if final_text.startswith(self.sent) else ""


def completion_logprobs(tokenizer, result: dict, n_tokens: int, k: int) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    tokens = [token_text(tokenizer, t) for t in result["token_ids"][:n_tokens]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = []
    for i in range(n_tokens):
        ids, lps = result["top_ids"][i][:k], result["top_logprobs"][i][:k]
        tops.append({token_text(tokenizer, t): float(lp) for t, lp in zip(ids, lps, strict=True)})
    return {
        "tokens": tokens,
        "token_logprobs": [float(x) for x in result["logprobs"][:n_tokens]],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def usage(prompt_ids: Sequence[Sequence[int]], choices: Sequence[dict]) -> dict:
    prompt = sum(len(p) for p in prompt_ids)
    completion = sum(len(c["token_ids"]) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
