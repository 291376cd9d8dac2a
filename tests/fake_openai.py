"""A fake OpenAI-compatible chat server on 127.0.0.1 for tests (no real API is ever contacted).

    def handler(request_json):            # the parsed POST body
        return "42", [("42", -0.1), ("41", -2.5)]   # content, first-token top logprobs

    with FakeOpenAI(handler, fail_first=2, fail_status=429) as server:
        client = ChatClient(server.base_url, "judge", api_key="sk-test")
        ...
        server.requests          # list of request bodies that were answered (failures excluded)
        server.auth_headers      # Authorization header of every request, failed ones included
        server.max_in_flight     # most requests handled at the same time

`fake_openai_server(handler, ...)` is the same as a context manager that yields the base_url string.
The handler's top logprobs may be a list of (token, logprob) pairs, a list of {"token", "logprob"} dicts or a
{token: logprob} dict; None sends ``"logprobs": null``. A handler may sleep to simulate latency. A handler that
raises gets a 400 answer (which clients do not retry) and the exception lands in ``handler_errors``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[dict], tuple[str, Any]]


def _normalise_top(top: Any) -> list[dict]:
    if top is None:
        return []
    if isinstance(top, dict):
        return [{"token": str(t), "logprob": float(lp)} for t, lp in top.items()]
    out = []
    for e in top:
        if isinstance(e, dict):
            out.append({"token": str(e["token"]), "logprob": float(e["logprob"])})
        else:
            t, lp = e
            out.append({"token": str(t), "logprob": float(lp)})
    return out


class FakeOpenAI:
    def __init__(
        self,
        handler: Handler | None = None,
        *,
        fail_first: int = 0,
        fail_status: int | list[int] = 500,
        retry_after: float | None = None,
        delay: float = 0.0,
    ):
        self.handler = handler or (lambda req: ("100", [("100", 0.0)]))
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.delay = delay
        self.requests: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.failed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.total_calls = 0
        self.handler_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a, **k):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.total_calls += 1
                    fake.auth_headers.append(self.headers.get("Authorization"))
                    fail_index = fake.failed if fake.failed < fake.fail_first else None
                    if fail_index is not None:
                        fake.failed += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if not self.path.rstrip("/").endswith("/chat/completions"):
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                        return
                    if fake.delay:
                        time.sleep(fake.delay)
                    if fail_index is not None:
                        st = fake.fail_status
                        status = st[fail_index % len(st)] if isinstance(st, list) else st
                        headers = {"Retry-After": str(fake.retry_after)} if fake.retry_after is not None else None
                        self._send(status, {"error": {"message": "simulated failure", "type": "fake"}}, headers)
                        return
                    try:
                        content, top = fake.handler(body)
                    except Exception as e:  # a broken handler answers 400 (not retried) and is recorded
                        with fake._lock:
                            fake.handler_errors.append(e)
                        self._send(400, {"error": {"message": f"fake handler raised {e!r}"[:300], "type": "fake"}})
                        return
                    with fake._lock:
                        fake.requests.append(body)
                    tops = _normalise_top(top)
                    logprobs = None
                    if body.get("logprobs"):
                        n = body.get("top_logprobs")
                        tops = tops[:n] if n is not None else tops
                        first_lp = tops[0]["logprob"] if tops else 0.0
                        first_tok = tops[0]["token"] if tops else content
                        logprobs = {
                            "content": [
                                {
                                    "token": first_tok,
                                    "logprob": first_lp,
                                    "bytes": None,
                                    "top_logprobs": [dict(t, bytes=None) for t in tops],
                                }
                            ],
                            "refusal": None,
                        }
                    self._send(
                        200,
                        {
                            "id": f"chatcmpl-fake-{len(fake.requests)}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model", "fake"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": content},
                                    "logprobs": logprobs,
                                    "finish_reason": "length",
                                }
                            ],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        },
                    )
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def fake_openai_server(handler: Handler | None = None, **kwargs):
    """Context manager yielding the base_url (a str whose ``.server`` is the running `FakeOpenAI`)."""
    with FakeOpenAI(handler, **kwargs) as server:
        yield BaseURL(server.base_url, server)


class BaseURL(str):
    server: FakeOpenAI

    def __new__(cls, url: str, server: FakeOpenAI):
        obj = super().__new__(cls, url)
        obj.server = server
        return obj
