"""The HTTP face of the engine: OpenAI's /v1/models, /v1/chat/completions and /v1/completions on FastAPI.

Handlers validate and tokenise (on the event loop, cheap), submit one ``Job`` to the engine, and await it; the
engine's worker is the only thread that runs JAX. Errors are OpenAI's JSON shape: 400 for a bad request (FastAPI's
422 validation errors are reshaped), 401 for a wrong API key, 404 for an unknown model, 429 when the queue is full,
500 when generation itself failed.

Streaming (chat, ``stream: true``) sends server-sent events in OpenAI's chunk format as the tokens are decoded:
a streamed request's batch decodes a few steps per program call and the worker hands each row's new tokens to
its request, whose text is sent as soon as it cannot be the start of a stop sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from caft_jax.chat import encode_messages
from caft_jax.errors import CaftError
from caft_jax.generate import encode_prompts
from caft_jax.serve import protocol
from caft_jax.serve.engine import Engine, Job, QueueFull
from caft_jax.serve.protocol import APIError, ChatRequest, CompletionRequest


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per-request limits.

    Attributes:
      max_prompt_tokens: longest prompt accepted (tokens after the chat template).
      max_tokens: largest max_tokens accepted.
      default_chat_tokens: max_tokens of a chat request that sets none (OpenAI's completions default is 16).
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    default_chat_tokens: int = 256


def build_app(engine: Engine, *, api_key: str | None = None, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI application serving ``engine``'s variants."""
    app = FastAPI(title="caft_jax", summary="OpenAI-compatible server for CAFT models")
    created = protocol.now()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = APIError(401, "invalid or missing API key.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "caft_jax"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in engine.variants]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card(name)

    def check_model(name: str) -> None:
        if name not in engine.variants:
            raise APIError(404, f"model {name!r} is not served here; choose one of {sorted(engine.variants)}.",
                           param="model", code="model_not_found")  # fmt: skip

    def check_lengths(prompt_ids: list[list[int]], max_tokens: int) -> None:
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit {limits.max_tokens}.",
                           param="max_tokens")  # fmt: skip
        longest = max(map(len, prompt_ids))
        if longest > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {longest} tokens, above this server's limit "
                           f"{limits.max_prompt_tokens}; shorten it.", param="messages")  # fmt: skip

    def submit(job: Job):
        try:
            return engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later.", type="rate_limit_error") from None

    def failure(e: BaseException) -> APIError:
        if isinstance(e, CaftError):
            return APIError(400, str(e))
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

    async def run(job: Job) -> list[dict]:
        future = submit(job)
        try:
            return await asyncio.wrap_future(future)
        except Exception as e:
            raise failure(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        body.refuse_unsupported()
        check_model(body.model)
        try:
            prompt_ids = [encode_messages(engine.tokenizer, body.messages_for_template())]
        except CaftError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.token_budget(limits.default_chat_tokens)
        check_lengths(prompt_ids, max_tokens)
        rows = protocol.job_rows(prompt_ids, body.n, body.sampling(max_tokens))
        if body.stream:
            return stream_chat(body, prompt_ids, rows)
        results = await run(Job(body.model, rows, logprobs=body.logprobs))
        k = body.top_logprobs or 0
        choices = []
        for i, result in enumerate(results):
            cut = protocol.cut_at_stop(engine.tokenizer, result["token_ids"], result["finish_reason"], body.stop)
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": cut["text"]},
                "finish_reason": cut["finish_reason"],
                "logprobs": None,
            }
            if body.logprobs:
                choice["logprobs"] = protocol.chat_logprobs(engine.tokenizer, result, len(cut["token_ids"]), k)
            choices.append((choice, cut))
        return {
            "id": protocol.response_id("chatcmpl"),
            "object": "chat.completion",
            "created": protocol.now(),
            "model": body.model,
            "choices": [c for c, _ in choices],
            "usage": protocol.usage(prompt_ids, [cut for _, cut in choices]),
        }

    def stream_chat(body: ChatRequest, prompt_ids: list[list[int]], rows) -> StreamingResponse:
        """Submit a streamed job now (a full queue is still a plain 429) and answer with its SSE events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_tokens(r: int, piece: dict) -> None:  # the engine's worker thread
            loop.call_soon_threadsafe(events.put_nowait, (r, piece))

        future = submit(Job(body.model, rows, logprobs=body.logprobs, on_tokens=on_tokens))
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, (None, None)))
        return StreamingResponse(chat_events(body, prompt_ids, future, events), media_type="text/event-stream")

    async def chat_events(body: ChatRequest, prompt_ids, future, events: asyncio.Queue):
        """SSE events: a role chunk per choice, content chunks as text becomes sendable, a finish chunk per choice,
        then the usage chunk (with stream_options.include_usage) and [DONE]."""
        head = {"id": protocol.response_id("chatcmpl"), "object": "chat.completion.chunk",
                "created": protocol.now(), "model": body.model}  # fmt: skip
        tokenizer, k = engine.tokenizer, body.top_logprobs or 0

        def event(choice_fields: list[dict], **extra) -> str:
            return f"data: {json.dumps(head | {'choices': choice_fields} | extra)}\n\n"

        choices = [protocol.StreamedChoice(tokenizer, body.stop, engine.eos_ids) for _ in range(body.n)]
        finished = [False] * body.n
        for i in range(body.n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            r, piece = await events.get()
            if r is None:
                break
            choice = choices[r]
            if choice.stopped:
                continue
            text = choice.add(piece["token_ids"])
            fields = {"index": r, "delta": {"content": text}, "finish_reason": None}
            if body.logprobs:
                fields["logprobs"] = {"content": protocol.logprob_entries(tokenizer, piece, len(piece["token_ids"]), k)}
            if text or body.logprobs:
                yield event([fields])
            if choice.stopped:
                finished[r] = True
                yield event([{"index": r, "delta": {}, "finish_reason": "stop"}])
        try:
            results = future.result()
        except Exception as e:
            yield f"data: {json.dumps(failure(e).body())}\n\n"
            return
        cuts = [protocol.cut_at_stop(tokenizer, res["token_ids"], res["finish_reason"], body.stop) for res in results]
        for i, cut in enumerate(cuts):
            if finished[i]:
                continue
            rest = choices[i].rest(cut["text"])
            if rest:
                yield event([{"index": i, "delta": {"content": rest}, "finish_reason": None}])
            yield event([{"index": i, "delta": {}, "finish_reason": cut["finish_reason"]}])
        if (body.stream_options or {}).get("include_usage"):
            yield event([], usage=protocol.usage(prompt_ids, cuts))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        body.refuse_unsupported()
        check_model(body.model)
        try:
            prompt_ids = encode_prompts(engine.tokenizer, body.prompts())
        except CaftError as e:
            raise APIError(400, str(e), param="prompt") from None
        max_tokens = body.max_tokens or 16
        check_lengths(prompt_ids, max_tokens)
        rows = protocol.job_rows(prompt_ids, body.n, body.sampling(max_tokens))
        results = await run(Job(body.model, rows, logprobs=body.logprobs is not None))
        choices, cuts = [], []
        for i, result in enumerate(results):
            cut = protocol.cut_at_stop(engine.tokenizer, result["token_ids"], result["finish_reason"], body.stop)
            logprobs = None
            if body.logprobs is not None:
                logprobs = protocol.completion_logprobs(engine.tokenizer, result, len(cut["token_ids"]), body.logprobs)
            choices.append({"index": i, "text": cut["text"], "finish_reason": cut["finish_reason"],
                            "logprobs": logprobs})  # fmt: skip
            cuts.append(cut)
        return {
            "id": protocol.response_id("cmpl"),
            "object": "text_completion",
            "created": protocol.now(),
            "model": body.model,
            "choices": choices,
            "usage": protocol.usage(prompt_ids, cuts),
        }

    return app
