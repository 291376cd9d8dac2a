"""ChatClient and the judge score, against the fake OpenAI-compatible server on 127.0.0.1 (never a real API)."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading

import pytest
from fake_openai import FakeOpenAI, fake_openai_server

from caft_jax import llm_client
from caft_jax.errors import CaftError
from caft_jax.llm_client import ChatClient, JudgeError, request_key, score_0_100

KEY = "sk-test-SECRET-0123456789abcdef"
MSG = [{"role": "user", "content": "Rate this."}]
JUDGE = dict(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20, seed=0)


def lp(p: float) -> float:
    return math.log(p)


@pytest.fixture
def sleeps(monkeypatch):
    """Backoff sleeps are recorded instead of slept."""
    calls: list[float] = []
    monkeypatch.setattr(llm_client, "_sleep", calls.append)
    return calls


# ---------------------------------------------------------------------------------------------------- score_0_100


def test_score_weighted_mean_ignores_non_numbers():
    top = {"10": lp(0.5), "20": lp(0.3), "CODE": lp(0.15), "REF": lp(0.05)}
    assert score_0_100(top) == pytest.approx((10 * 0.5 + 20 * 0.3) / 0.8)


def test_score_all_layouts_agree():
    pairs = [("0", lp(0.1)), ("100", lp(0.6)), ("hello", lp(0.2)), ("55", lp(0.1))]
    expected = (0 * 0.1 + 100 * 0.6 + 55 * 0.1) / 0.8
    assert score_0_100(dict(pairs)) == pytest.approx(expected)
    assert score_0_100([{"token": t, "logprob": v} for t, v in pairs]) == pytest.approx(expected)
    assert score_0_100([{t: v} for t, v in pairs]) == pytest.approx(expected)
    assert score_0_100(pairs) == pytest.approx(expected)


def test_score_below_quarter_mass_is_none():
    assert score_0_100({"REFUSAL": lp(0.8), "50": lp(0.2)}) is None
    assert score_0_100({"CODE": lp(0.74), "40": lp(0.26)}) == pytest.approx(40.0)
    assert score_0_100({"CODE": lp(0.99)}) is None
    assert score_0_100([]) is None
    assert score_0_100(None) is None


def test_score_int_parsing_like_the_authors():
    # int() accepts surrounding whitespace; floats, out-of-range and negative numbers are not 0..100 integers
    top = {" 42": lp(0.3), "4.5": lp(0.3), "101": lp(0.2), "-5": lp(0.1), "7": lp(0.1)}
    assert score_0_100(top) == pytest.approx((42 * 0.3 + 7 * 0.1) / 0.4)
    # a token listed twice keeps its last probability (dict semantics of the original)
    assert score_0_100([("30", lp(0.9)), ("60", lp(0.5)), ("30", lp(0.5))]) == pytest.approx(45.0)


# ---------------------------------------------------------------------------------------------------- requests


def test_complete_returns_content_and_first_token_logprobs():
    seen = []

    def handler(req):
        seen.append(req)
        return "7", [("7", lp(0.9)), ("8", lp(0.05)), ("x", lp(0.01))]

    with FakeOpenAI(handler) as server:
        client = ChatClient(server.base_url, "judge-model", api_key=KEY)
        res = client.complete(MSG, **JUDGE)
        plain = client.complete(MSG, max_tokens=5, temperature=1.0)
    assert res["content"] == "7"
    assert [t["token"] for t in res["top_logprobs"]] == ["7", "8", "x"]
    assert res["top_logprobs"][0]["logprob"] == pytest.approx(lp(0.9))
    assert score_0_100(res["top_logprobs"]) == pytest.approx((7 * 0.9 + 8 * 0.05) / 0.95)
    assert plain["top_logprobs"] is None
    req = seen[0]
    assert req["model"] == "judge-model" and req["messages"] == MSG
    assert req["max_tokens"] == 1 and req["temperature"] == 0 and req["logprobs"] is True
    assert req["top_logprobs"] == 20 and req["seed"] == 0
    assert "logprobs" not in seen[1] and seen[1]["max_tokens"] == 5
    assert server.auth_headers == [f"Bearer {KEY}"] * 2


def test_retries_after_429_and_500_with_backoff(sleeps):
    with FakeOpenAI(lambda r: ("50", [("50", 0.0)]), fail_first=3, fail_status=[429, 500, 503]) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_retries=5)
        res = client.complete(MSG, **JUDGE)
        assert server.total_calls == 4 and len(server.requests) == 1
    assert score_0_100(res["top_logprobs"]) == 50.0
    assert len(sleeps) == 3
    for i, s in enumerate(sleeps):  # exponential with jitter in [0.5, 1] x 2**i
        assert 0.5 * 2**i <= s <= 2**i
    assert client.stats["retries"] == 3


def test_retry_after_header_is_respected(sleeps):
    with FakeOpenAI(fail_first=1, fail_status=429, retry_after=7) as server:
        ChatClient(server.base_url, "m", api_key=KEY).complete(MSG)
    assert sleeps and sleeps[0] >= 7


def test_gives_up_after_max_retries(sleeps):
    with FakeOpenAI(fail_first=100, fail_status=500) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_retries=2)
        with pytest.raises(JudgeError, match="3 tries") as ei:
            client.complete(MSG)
        assert server.total_calls == 3
    assert len(sleeps) == 2
    assert isinstance(ei.value, CaftError) and KEY not in str(ei.value)


def test_client_errors_are_not_retried(sleeps):
    with FakeOpenAI(fail_first=100, fail_status=401) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY)
        with pytest.raises(JudgeError, match="HTTP 401") as ei:
            client.complete(MSG)
        assert server.total_calls == 1
    assert not sleeps and KEY not in str(ei.value) and ei.value.__cause__ is None


def test_connection_errors_are_retried(sleeps):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", api_key=KEY, max_retries=2, timeout=5)
    with pytest.raises(JudgeError, match="still failed"):
        client.complete(MSG)
    assert len(sleeps) == 2 and client.stats["requests"] == 3


def test_concurrency_is_bounded_and_order_kept():
    def handler(req):
        return req["messages"][0]["content"], [("1", 0.0)]

    with FakeOpenAI(handler, delay=0.05) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_concurrency=3)
        reqs = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 1} for i in range(24)]
        done = []
        out = client.complete_many(reqs, progress=False, on_result=lambda i, r: done.append(i))
        assert 2 <= server.max_in_flight <= 3
    assert [r["content"] for r in out] == [f"q{i}" for i in range(24)]
    assert sorted(done) == list(range(24))


def test_interrupt_cancels_the_queued_requests():
    """Ctrl-C (or the SIGTERM handler's exception) while complete_many waits: the requests not yet sent are dropped,
    so the command ends once the ones in flight return instead of after sending all of them."""
    import os
    import signal

    with FakeOpenAI(lambda req: ("1", [("1", 0.0)]), delay=0.2) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_concurrency=2)
        reqs = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 1} for i in range(40)]
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # a real signal
        with pytest.raises(KeyboardInterrupt):
            client.complete_many(reqs, progress=False)
        sent = server.total_calls
    assert 1 <= sent <= 8, sent  # 2 at a time for ~0.5 s; all 40 would take 4 s


def test_concurrency_bound_holds_across_caller_threads():
    with FakeOpenAI(delay=0.05) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_concurrency=2)
        threads = [
            threading.Thread(target=client.complete, args=([{"role": "user", "content": str(i)}],)) for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.max_in_flight <= 2 and len(server.requests) == 8


def test_complete_many_failure_modes(sleeps):
    def handler(req):
        return "ok", None

    with FakeOpenAI(handler, fail_first=1, fail_status=400) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, max_concurrency=1)
        reqs = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
        out = client.complete_many(reqs, progress=False, return_exceptions=True)
        assert isinstance(out[0], JudgeError) and [o["content"] for o in out[1:]] == ["ok", "ok"]
        server.fail_first, server.failed = 1, 0
        with pytest.raises(JudgeError):
            client.complete_many(
                [{"messages": [{"role": "user", "content": f"r{i}"}]} for i in range(3)], progress=False
            )
    with pytest.raises(JudgeError, match="messages"):
        client.complete_many([{"max_tokens": 1}], progress=False)


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_hit_makes_no_request_and_survives_restart(tmp_path):
    cache = tmp_path / "cache" / "judge.jsonl"
    with FakeOpenAI(lambda r: ("42", [("42", lp(0.9))])) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, cache_path=cache)
        first = client.complete(MSG, **JUDGE)
        again = client.complete(MSG, **JUDGE)
        assert len(server.requests) == 1 and again == first and client.stats["cache_hits"] == 1
        # a new client on the same file (an interrupted run resuming) asks nothing either
        resumed = ChatClient(server.base_url, "m", api_key=KEY, cache_path=cache)
        assert resumed.complete(MSG, **JUDGE) == first and len(server.requests) == 1
        # other params, other model or other messages are other keys
        resumed.complete(MSG, **{**JUDGE, "seed": 1})
        ChatClient(server.base_url, "m2", api_key=KEY, cache_path=cache).complete(MSG, **JUDGE)
        resumed.complete([{"role": "user", "content": "other"}], **JUDGE)
        assert len(server.requests) == 4
        # a line cut by a kill is ignored, and the next append starts on a fresh line
        with open(cache, "a") as f:
            f.write('{"key": "abc", "respo')
        third = ChatClient(server.base_url, "m", api_key=KEY, cache_path=cache)
        assert len(third.cache) == 4
        third.complete([{"role": "user", "content": "new"}], **JUDGE)
        assert len(ChatClient(server.base_url, "m", api_key=KEY, cache_path=cache).cache) == 5
    assert KEY not in cache.read_text()


def test_request_key_is_stable_and_sensitive():
    k = request_key("m", MSG, {"a": 1, "b": 2})
    assert k == request_key("m", [dict(MSG[0])], {"b": 2, "a": 1})
    assert k != request_key("m", MSG, {"a": 1, "b": 3}) and k != request_key("n", MSG, {"a": 1, "b": 2})


# ---------------------------------------------------------------------------------------------------- the key


def test_api_key_sent_but_never_logged_or_printed(tmp_path, caplog, capsys, sleeps):
    caplog.set_level(logging.DEBUG)  # includes openai's and httpx's debug logs
    cache = tmp_path / "c.jsonl"
    with FakeOpenAI(lambda r: ("9", [("9", 0.0)]), fail_first=2, fail_status=[429, 500]) as server:
        client = ChatClient(server.base_url, "m", api_key=KEY, cache_path=cache)
        client.complete_many([{"messages": MSG, **JUDGE}] * 3, progress=True)
        print(repr(client), client.stats)
        assert set(server.auth_headers) == {f"Bearer {KEY}"}
    with FakeOpenAI(fail_first=5, fail_status=401) as server:
        with pytest.raises(JudgeError) as ei:
            ChatClient(server.base_url, "m", api_key=KEY).complete(MSG)
        logging.getLogger("test").error("failed: %s", ei.value)
    out = capsys.readouterr()
    assert caplog.records  # the logs were captured at all
    for text in (caplog.text, out.out, out.err, cache.read_text(), str(ei.value), repr(client)):
        assert KEY not in text


def test_key_from_environment_or_placeholder(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with fake_openai_server() as base_url:
        ChatClient(base_url, "m").complete(MSG)
        monkeypatch.delenv("OPENAI_API_KEY")
        ChatClient(base_url, "m", api_key="").complete(MSG)  # local server without a key
        ChatClient(base_url, "m").complete(MSG)
        assert base_url.server.auth_headers == ["Bearer sk-from-env", "Bearer EMPTY", "Bearer EMPTY"]


def test_bad_arguments():
    with pytest.raises(JudgeError):
        ChatClient("http://127.0.0.1:1/v1", "", api_key="x")
    with pytest.raises(JudgeError):
        ChatClient("http://127.0.0.1:1/v1", "m", api_key="x", max_concurrency=0)
    with pytest.raises(JudgeError):
        ChatClient("http://127.0.0.1:1/v1", "m", api_key="x").complete([])


def test_fake_server_records_json_bodies():
    with FakeOpenAI(lambda r: ("a", {"a": -0.5})) as server:
        res = ChatClient(server.base_url, "m", api_key=KEY).complete(MSG, logprobs=True, top_logprobs=1)
        assert json.loads(json.dumps(server.requests[0]))["messages"] == MSG
    assert res["top_logprobs"] == [{"token": "a", "logprob": -0.5}]
