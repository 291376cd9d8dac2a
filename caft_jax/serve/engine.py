"""The serving engine: named model variants, a bounded request queue, and one worker that batches requests.

Every variant is the one loaded base model with its own traced side inputs (a LoRA adapter, a test-time
intervention, both or neither), so serving "base", "caft" and "caft+ablation" costs one copy of the weights. The
worker thread takes the first waiting request, collects more for a short window (up to ``max_batch`` rows), and
hands each variant's rows to ``generate_rows`` as one call: concurrent requests share a batch, and rows, prompt
lengths and token budgets are rounded up to a few bucket sizes so the number of compiled programs stays small.
HTTP handlers never touch JAX: they submit a ``Job`` and await its future.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from caft_jax.batching import Bucketer
from caft_jax.generate import MAX_TOP_LOGPROBS, Row, generate_rows, pad_id_for, stop_token_ids
from caft_jax.model.layers import LoraSettings
from caft_jax.model.transformer import Model
from caft_jax.projector import Projector

log = logging.getLogger(__name__)

# Token budgets: 16, 32, 64, ... so a server mixing max_tokens values compiles a handful of decode lengths.
NEW_TOKEN_BUCKETS = Bucketer((16,), grow=True)


class QueueFull(Exception):
    """The request queue holds its limit; the HTTP layer answers 429."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A servable model: the base weights plus optional traced side inputs."""

    name: str
    lora: dict | None = None
    lora_settings: LoraSettings | None = None
    projector: Projector | None = None


@dataclasses.dataclass
class Job:
    """One request's rows (n choices of one or more prompts) for one variant.

    ``on_tokens(row, piece)``, when set, is called from the worker thread with each row's new tokens as they are
    decoded (a streamed request); the future still resolves with the whole rows at the end.
    """

    variant: str
    rows: list[Row]
    logprobs: bool = False
    on_tokens: Callable[[int, dict], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Batching limits.

    Attributes:
      max_batch: rows (requests x n) per generate call at most.
      window_ms: after the first waiting request, wait this long for others to share its batch.
      queue_limit: requests waiting at most; one more is refused (HTTP 429).
    """

    max_batch: int = 32
    window_ms: float = 10.0
    queue_limit: int = 256

    def __post_init__(self):
        for name, low in (("max_batch", 1), ("window_ms", 0), ("queue_limit", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")


def row_buckets(max_batch: int) -> Bucketer:
    """Batch widths 1, 2, 4, ... up to max_batch: a batch of 5 rows runs as 8 (3 inactive rows), not as its own
    program."""
    sizes, width = [], 1
    while width < max_batch:
        sizes.append(width)
        width *= 2
    return Bucketer(sorted({*sizes, max_batch}))


class Engine:
    """Owns the model and the worker thread. ``submit`` is thread-safe and never blocks on JAX."""

    def __init__(self, model: Model, tokenizer, variants: Sequence[Variant], settings: EngineSettings):
        if not variants:
            raise ValueError("at least one variant is needed")
        self.model = model
        self.tokenizer = tokenizer
        self.variants = {v.name: v for v in variants}
        self.settings = settings
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.pad_id = pad_id_for(model, tokenizer)
        self.batches_run = 0  # generate calls made (the benchmark and tests read it)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=settings.queue_limit)
        self._buckets = row_buckets(settings.max_batch)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._serve_forever, name="caft-serve-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------ intake

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job; raises QueueFull when the queue is at its limit, KeyError for an unknown variant."""
        if job.variant not in self.variants:
            raise KeyError(job.variant)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.qsize()} requests are waiting (the limit)") from None
        return job.future

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)

    # ------------------------------------------------------------------------------------------------ worker

    def _collect(self) -> list[Job]:
        """The first waiting job plus those that arrive within the window, up to max_batch rows."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.settings.window_ms / 1000
        while rows < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _serve_forever(self) -> None:
        while not self._stop.is_set():
            jobs = self._collect()
            groups: dict[tuple[str, bool, bool], list[Job]] = {}
            for job in jobs:
                groups.setdefault((job.variant, job.logprobs, job.on_tokens is not None), []).append(job)
            for (name, logprobs, streamed), group in groups.items():
                self._run_group(self.variants[name], group, logprobs, streamed)

    def _run_group(self, variant: Variant, jobs: list[Job], logprobs: bool, streamed: bool) -> None:
        """One generate call (or a few, past max_batch rows) for jobs of one variant; resolves their futures.

        Streamed jobs decode in chunks of steps (each chunk's tokens go to their job's ``on_tokens``); the others
        decode in one program, so streaming costs only the requests that ask for it.
        """
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        rows = [row for job in live for row in job.rows]
        if not rows:
            return
        owners = [(job, r) for job in live for r in range(len(job.rows))]  # global row -> (job, its row)

        def dispatch(i: int, piece: dict) -> None:
            job, r = owners[i]
            try:
                job.on_tokens(r, piece)
            except Exception:  # a client that went away must not stop the batch it shares with others
                log.exception("dropping streamed tokens")

        try:
            results = generate_rows(
                self.model,
                rows,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                lora=variant.lora,
                lora_settings=variant.lora_settings,
                projector=variant.projector,
                batch_size=self.settings.max_batch,
                progress=False,
                top_logprobs=MAX_TOP_LOGPROBS if logprobs else None,
                new_token_buckets=NEW_TOKEN_BUCKETS,
                row_buckets=self._buckets,
                on_tokens=dispatch if streamed else None,
            )
        except Exception as e:  # a bug or a device failure: every waiting client gets a 500, the server lives on
            log.exception("generation failed")
            for job in live:
                job.future.set_exception(e)
            return
        self.batches_run += 1
        start = 0
        for job in live:
            job.future.set_result(results[start : start + len(job.rows)])
            start += len(job.rows)
