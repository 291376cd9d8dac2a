"""`caft serve` against the real `openai` client: a server on 127.0.0.1 over a tiny chat model with an adapter
and a test-time ablation, checked against `eval.py generate` and our own forward's log-softmax."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from hf_models import save_chat_model_with_adapter

from caft_jax import jit_forward, load_model
from caft_jax.cli.evaluate import main as eval_main
from caft_jax.serve import cli as serve_cli

PROMPTS = ["Hello world", "how are you?", "print(1)", "I am fine", "Answer: A", "thank you"]
NEW = 12
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model dir, adapter dir, ablation spec) of a tiny ChatML llama."""
    return save_chat_model_with_adapter(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(files):
    """A running server (in this process, so the test can read its engine); yields (base_url, engine)."""
    import uvicorn

    model_dir, adapter, spec = files
    port = free_port()
    args = parse(["--model", str(model_dir), "--adapter", str(adapter), "--ablate", str(spec), "--port", str(port),
                  "--api-key", KEY, "--max-tokens", "256", "--window-ms", "30"])  # fmt: skip
    app, engine = serve_cli.build(args)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """`eval.py generate --chat --greedy` texts per served variant: {variant: [text per prompt]}."""
    model_dir, adapter, spec = files
    out = {}
    for name, extra in {"base": [], "caft": ["--adapter", str(adapter)],
                        "caft+ablation": ["--adapter", str(adapter), "--ablate", str(spec)]}.items():  # fmt: skip
        path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
        argv = ["generate", "--model", str(model_dir), *extra, "--prompt", *PROMPTS, "--chat", "--greedy",
                "--max-new-tokens", str(NEW), "--out", str(path), "--no-progress"]  # fmt: skip
        assert eval_main(argv) == 0
        out[name] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def chat(client, prompt, model="base", **kw):
    kw.setdefault("max_tokens", NEW)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def test_models_lists_every_variant(client):
    names = [m.id for m in client.models.list().data]
    assert names == ["base", "caft", "base+ablation", "caft+ablation"]
    assert client.models.retrieve("caft+ablation").id == "caft+ablation"


def test_greedy_chat_equals_eval_generate_per_variant(client, reference):
    for variant, rows in reference.items():
        for prompt, row in zip(PROMPTS, rows, strict=True):
            out = chat(client, prompt, variant)
            assert out.choices[0].message.content == row["text"], (variant, prompt)
            assert out.choices[0].finish_reason == row["finish_reason"]
            assert out.usage.completion_tokens == len(row["token_ids"]) - (row["finish_reason"] == "stop")
    texts = {v: [r["text"] for r in rows] for v, rows in reference.items()}
    assert texts["base"] != texts["caft"] != texts["caft+ablation"]  # the variants really differ


def test_top_logprobs_equal_our_log_softmax(client, files, server):
    model_dir = files[0]
    engine = server[1]
    out = chat(client, PROMPTS[0], logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    prompt_ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    text_ids = engine.tokenizer(out.choices[0].message.content, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(text_ids)
    logits = jit_forward(load_model(model_dir), jnp.asarray([ids])).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(prompt_ids) - 1 : len(ids) - 1]
    assert len(content) == len(text_ids)
    for step, entry in enumerate(content):
        best = np.argsort(-logp[step])[:5]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], logp[step][best], atol=1e-5)
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([int(i)]) for i in best]
        assert entry.logprob == pytest.approx(float(logp[step][text_ids[step]]), abs=1e-5)


def test_completions_endpoint_and_its_logprobs(client, reference, server):
    tokenizer = server[1].tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    out = client.completions.create(model="base", prompt=[prompt, prompt], max_tokens=NEW, temperature=0, logprobs=3)
    assert [c.text for c in out.choices] == [reference["base"][1]["text"]] * 2
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and len(lp.top_logprobs[0]) == 3
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0


def stop_case(reference) -> tuple[str, int, str, str]:
    """(variant, prompt index, stop string, its answer's text) where the stop string first occurs past position 2,
    so that cutting at it keeps some text."""
    for variant, rows in reference.items():
        for i, row in enumerate(rows):
            text = row["text"]
            for at in range(3, len(text) - 1):
                stop = text[at : at + 2]
                if text.find(stop) == at and "\ufffd" not in stop:
                    return variant, i, stop, text
    raise AssertionError("no answer of the reference has a usable stop string")


def test_stop_sequences(client, reference):
    variant, i, stop, text = stop_case(reference)
    out = chat(client, PROMPTS[i], variant, stop=[stop, "never-appears"])
    assert out.choices[0].message.content == text[: text.find(stop)] != ""
    assert out.choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_samples(client):
    kw = dict(n=3, temperature=1.5, seed=7, max_tokens=NEW)
    a, b = chat(client, PROMPTS[2], **kw), chat(client, PROMPTS[2], **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # the seed makes the request reproducible
    assert len(set(texts)) > 1  # and the choices are different samples
    assert texts != [c.message.content for c in chat(client, PROMPTS[2], **{**kw, "seed": 8}).choices]


def collect_stream(stream) -> tuple[dict, dict, object]:
    """({choice index: [content pieces]}, {index: finish_reason}, usage) of a streamed chat completion."""
    pieces, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.setdefault(choice.index, []).append(choice.delta.content)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return pieces, finish, usage


def test_streaming_sends_the_answer_as_it_is_decoded(client, reference):
    row = reference["base"][0]  # 12 printable tokens: no character is held back for being incomplete
    stream = chat(client, PROMPTS[0], "base", stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = collect_stream(stream)
    assert "".join(pieces[0]) == row["text"] and finish == {0: row["finish_reason"]}
    assert len(pieces[0]) >= 2  # 12 tokens decoded 8 steps per call: the text arrives in more than one piece
    assert usage is not None and usage.completion_tokens == len(row["token_ids"]) - (row["finish_reason"] == "stop")
    # a stop sequence and n = 2 greedy choices: each choice's text is the non-streamed one, cut before the stop
    variant, i, stop, text = stop_case(reference)
    pieces, finish, _ = collect_stream(chat(client, PROMPTS[i], variant, stream=True, stop=[stop], n=2))
    assert ["".join(pieces.get(j, [])) for j in (0, 1)] == [text[: text.find(stop)]] * 2
    assert finish == {0: "stop", 1: "stop"}


def test_bad_requests_are_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        chat(client, "hi", "gpt-4")
    bad = [dict(temperature=3.0), dict(n=0), dict(top_p=0.0), dict(max_tokens=257), dict(presence_penalty=1.0),
           dict(top_logprobs=3), dict(stop=["a", "b", "c", "d", "e"]),
           dict(tools=[{"type": "function", "function": {"name": "f"}}])]  # fmt: skip
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "hi", **kw)
        assert err.value.status_code == 400 and err.value.body["message"], kw
    with pytest.raises(openai.BadRequestError, match="only text content"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="base", messages=[])
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0), "hi")


def test_32_concurrent_requests_are_batched_and_all_correct(client, reference, server):
    engine = server[1]
    jobs = [(PROMPTS[i % len(PROMPTS)], ("base", "caft")[i % 2]) for i in range(32)]
    before = engine.batches_run
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: chat(client, job[0], job[1]).choices[0].message.content, jobs))
    for (prompt, variant), answer in zip(jobs, answers, strict=True):
        assert answer == reference[variant][PROMPTS.index(prompt)]["text"]
    assert engine.batches_run - before < 16  # shared batches, not one generate call per request


def test_full_queue_answers_429(files, monkeypatch):
    """A worker held inside generation, a queue of one: the third request is refused, the others are answered."""
    from caft_jax.serve import engine as engine_module

    release = threading.Event()
    real = engine_module.generate_rows

    def held(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_rows", held)
    model_dir = files[0]
    model = load_model(model_dir)
    from caft_jax import load_tokenizer
    from caft_jax.generate import Row, SamplingConfig

    eng = engine_module.Engine(model, load_tokenizer(model_dir), [engine_module.Variant("base")],
                               engine_module.EngineSettings(max_batch=1, window_ms=0, queue_limit=1))  # fmt: skip
    row = [Row([5, 6, 7], SamplingConfig(max_new_tokens=2, greedy=True))]
    first = eng.submit(engine_module.Job("base", row))
    deadline = time.monotonic() + 10
    while not first.running():  # the worker has taken the first job and is held
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = eng.submit(engine_module.Job("base", row))
    with pytest.raises(engine_module.QueueFull):
        eng.submit(engine_module.Job("base", row))
    release.set()
    assert len(first.result(60)) == len(second.result(60)) == 1
    eng.close()


def test_cli_refuses_bad_input_before_loading(files, tmp_path, capsys):
    model_dir, adapter, spec = files
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = {
        "no such file": ["--adapter", str(tmp_path / "missing")],
        "no adapter_config.json": ["--adapter", str(tmp_path)],
        "share a name": ["--adapter", str(adapter), "--adapter", str(adapter)],
        "cannot listen": ["--port", str(busy.getsockname()[1])],
        "--max-batch must be at least 1": ["--max-batch", "0"],
        "letters, digits": ["--adapter", f"bad name={adapter}"],
    }
    try:
        for message, extra in cases.items():
            assert serve_cli.main(["--model", str(model_dir), *extra]) == 2
            assert message in capsys.readouterr().err, message
    finally:
        busy.close()


def test_autointerp_selection_runs_against_the_server(server, client, tmp_path, monkeypatch, capsys):
    """`discover select --autointerp` with the served fine-tune as explainer and scorer: the explanations and scores
    it records are the server's greedy answers to the same requests, and the spec keeps the PCs scoring >= 0."""
    from caft_jax.ablation_spec import load_ablation_spec
    from caft_jax.discovery.autointerp import explain_messages, score_messages
    from caft_jax.discovery.cli import main as discover
    from caft_jax.discovery.display_report import write_display_report
    from caft_jax.discovery.displays import Context, FeatureDisplay
    from caft_jax.discovery.pca import pca_exact, save_pca
    from caft_jax.llm_client import score_text_0_100

    d = server[1].model.spec.d_model
    pca = save_pca(tmp_path / "pca.safetensors", {1: pca_exact(np.random.default_rng(0).normal(size=(32, d)), 3)})
    ctx = [Context(i, 1, ["Hello", " world", " here"], [1, 2, 3], [0.1, 2.0 - i, 0.3], 1, 2.0 - i) for i in range(3)]
    features = [FeatureDisplay(1, i, "pc", 0.1, "explained_variance_ratio", ctx, ctx[:1]) for i in range(2)]
    displays = write_display_report(features, tmp_path)["json"]
    monkeypatch.setenv("CAFT_TEST_KEY", KEY)
    argv = ["select", "--pca", str(pca), "--autointerp", "Greetings such as hello.", "--displays", str(displays),
            "--autointerp-base-url", server[0], "--autointerp-model", "caft", "--autointerp-api-key-env",
            "CAFT_TEST_KEY", "--autointerp-score", "text", "--threshold", "0", "--autointerp-timeout", "300",
            "--out-dir", str(tmp_path / "sel")]  # fmt: skip
    code = discover(argv)
    records = [json.loads(line) for line in (tmp_path / "sel" / "autointerp.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sign"]) for r in records] == [(0, "+"), (0, "-"), (1, "+"), (1, "-")]
    for r in records:
        feature = features[r["index"]]
        explain = client.chat.completions.create(model="caft", messages=explain_messages(feature, r["sign"]),
                                                 max_tokens=200, temperature=0, seed=0)  # fmt: skip
        assert r["explanation"] == explain.choices[0].message.content.strip()
        scored = client.chat.completions.create(model="caft", messages=score_messages(r["explanation"], "Greetings "
                                                "such as hello."), max_tokens=4, temperature=0, seed=0)  # fmt: skip
        assert r["score"] == score_text_0_100(scored.choices[0].message.content)
    kept = sorted({r["index"] for r in records if r["score"] is not None})
    if kept:  # the spec holds exactly the PCs with a readable score (every score is >= 0)
        assert code == 0 and sorted(load_ablation_spec(tmp_path / "sel" / "ablation_spec.safetensors")[0]) == [1]
    else:  # a tiny random model may write no number at all: then nothing can be selected, and it says so
        assert code == 2 and "error:" in capsys.readouterr().err


def test_inspect_ai_openai_compatible_provider(server, reference, tmp_path, monkeypatch):
    """inspect_ai's OpenAI-compatible provider (`openai-api/<name>/<model>`) pointed at the server: one small task,
    its answers the server's greedy answers (eval.py generate's)."""
    from inspect_ai import Task, eval
    from inspect_ai.dataset import Sample
    from inspect_ai.model import GenerateConfig
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    monkeypatch.setenv("CAFT_BASE_URL", server[0])
    monkeypatch.setenv("CAFT_API_KEY", KEY)
    rows = reference["caft"]
    task = Task(
        dataset=[Sample(input=p, target=r["text"][:3] or "x") for p, r in zip(PROMPTS[:3], rows, strict=False)],
        solver=generate(),
        scorer=includes(),
        config=GenerateConfig(temperature=0.0, max_tokens=NEW),
    )
    (log,) = eval(task, model="openai-api/caft/caft", log_dir=str(tmp_path), display="none")
    assert log.status == "success", log.error
    answers = [s.output.completion for s in sorted(log.samples, key=lambda s: s.id)]
    assert answers == [r["text"] for r in rows[:3]]
