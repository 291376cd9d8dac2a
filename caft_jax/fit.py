"""The one training loop: train.py and the pipeline both fine-tune through `fit`.

It owns what every run needs around `CaftTrainer.step`: the data position (epoch, batch) that a resume continues
from, periodic checkpoints, the NaN guard (a step whose loss, gradients or updated parameters are not finite
changes nothing and stops the run, naming the last good checkpoint), SIGINT/SIGTERM (the step in flight finishes,
a final checkpoint is written, and the run reports where it stopped), metrics.jsonl (each step once, also across
resumes) and the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from caft_jax import data
from caft_jax.errors import CaftError

# Exit codes of an interrupted run, as a shell reports a process killed by the signal (128 + signal number).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

BatchSource = Callable[[int, int], Iterable[dict]]  # (epoch, first batch index) -> host batches [rows, t]


class TrainingDiverged(CaftError):
    """The loss, the gradients or the updated parameters became NaN/inf."""


class TrainingInterrupted(CaftError):
    """SIGINT or SIGTERM arrived; the run stopped after its current step (and saved, when it checkpoints)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class FitResult:
    """Where a run ended: ``status`` is "done", "diverged" or "interrupted"."""

    state: object
    step: int
    status: str
    losses: list[float]
    seconds: float
    position: dict
    signal: int | None = None
    bad_step: int | None = None  # the step whose loss, gradients or parameters were not finite


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (handlers exist only in the main thread)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_EXIT:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def params_finite(tree) -> bool:
    """Whether every parameter is finite: checked only before a checkpoint (a per-step check would cost a full
    pass over the weights and keep XLA from fusing the update with the NaN guard's select)."""
    return bool(_all_finite(tree))


def truncate_metrics(path: pathlib.Path, after_step: int) -> None:
    """Keep only the metrics lines of steps <= ``after_step`` (a resume rewrites what followed its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _epochs(batches: BatchSource, position: dict) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batch index, batch) from ``position`` on, epoch after epoch."""
    epoch, start = position["epoch"], position["batch"]
    while True:
        produced = False
        for index, batch in enumerate(batches(epoch, start), start=start):
            produced = True
            yield epoch, index, batch
        if not produced and start == 0:
            raise CaftError("the training data produced no batches; check the data file and batch_size.")
        epoch, start = epoch + 1, 0


def fit(
    trainer,
    state,
    batches: BatchSource,
    total_steps: int,
    *,
    projector=None,
    grad_accum: int = 1,
    position: dict | None = None,
    checkpoints=None,
    checkpoint_config: dict | None = None,
    metrics_path: pathlib.Path | None = None,
    log_every: int = 1,
    on_metrics: Callable[[dict], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    leave: bool = True,
    stop_after_step: int = 0,
) -> FitResult:
    """Train ``state`` with ``trainer`` until ``total_steps`` (or a NaN, or a signal).

    Args:
      batches: the data, as a function of (epoch, first batch index) so a resume continues mid-epoch.
      grad_accum: micro-batches per step; each batch's rows are split into that many.
      position: {"epoch", "batch"} to start from (a restored checkpoint's data position).
      checkpoints: a `caft_jax.checkpoint.CheckpointManager`, or None for runs that do not checkpoint.
      metrics_path: metrics.jsonl to append one line per logged step to (main process only).
      on_metrics: called with each step's record (e.g. a TensorBoard writer).
      stop_after_step: test hook: stop as if SIGKILLed after this step's checkpoint.
    """
    from tqdm.auto import tqdm

    is_main = jax.process_index() == 0
    watched = projector.active_layers() if projector is not None else []
    position = dict(position or {"epoch": 0, "batch": 0})
    step = int(state.step)
    losses: list[float] = []
    started, tokens_seen, real_tokens, status, bad_step = time.time(), 0.0, 0, "done", None
    bar = tqdm(
        total=total_steps, initial=step, disable=not (progress and is_main), desc=desc, leave=leave, dynamic_ncols=True
    )
    metrics_file = open(metrics_path, "a") if (metrics_path and is_main) else None  # noqa: SIM115 - closed below
    with _SignalFlag() as signals, metrics_file or contextlib.nullcontext():
        for epoch, index, batch in _epochs(batches, position):
            if step >= total_steps:
                break
            real_tokens += int(np.asarray(batch["attn_mask"]).sum())
            local = data.split_for_processes(batch, jax.process_index(), jax.process_count())
            micro = {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in local.items() if v.ndim == 2}
            state, metrics = trainer.step(state, micro, projector)
            metrics = jax.device_get(metrics)
            projection = projection_record(metrics.pop("projection", None), watched)
            metrics = {k: float(v) for k, v in metrics.items()}
            if not metrics["finite"]:
                status, bad_step = "diverged", step + 1
                break
            step += 1
            losses.append(metrics["loss"])
            tokens_seen += metrics["tokens"]
            rate = tokens_seen / max(time.time() - started, 1e-9)
            record = {"step": step, "epoch": epoch, **metrics, "tokens_per_s": rate}
            if projection:
                record["projection"] = projection
            if step % log_every == 0:
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if on_metrics is not None:
                    on_metrics(record)
            elapsed = max(time.time() - started, 1e-9)  # the bar shows all real (non-pad) tokens, the log trained ones
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                tok_s=f"{real_tokens / elapsed:.0f}",
                **({"proj": projection_summary(projection)} if projection else {}),
            )
            bar.update(1)
            position = {"epoch": epoch, "batch": index + 1}
            stopping = signals.received is not None
            final = step == total_steps or stopping
            if checkpoints is not None and checkpoints.is_due(step, final) and not params_finite(state.trainable):
                # finite loss and gradients, but the update overflowed: never checkpoint it
                status, bad_step = "diverged", step
                break
            if checkpoints is not None:
                checkpoints.save(
                    step,
                    state,
                    projector=projector,
                    data_position=position,
                    config=checkpoint_config,
                    force=final,
                )
            if stopping:
                status = "interrupted"
                break
            if stop_after_step and step == stop_after_step:
                status = "stopped"
                break
        bar.close()
        if checkpoints is not None:
            checkpoints.wait()  # inside the handlers: a signal now must not abandon the save
    return FitResult(
        state=state,
        step=step,
        status=status,
        losses=losses,
        seconds=time.time() - started,
        position=position,
        signal=signals.received,
        bad_step=bad_step,
    )


def projection_record(stats, layers: list[int]) -> dict:
    """{"<layer>": {"mean", "max"}} of |(h - mu) . q| before the intervention, for the layers it acts on."""
    if stats is None:
        return {}
    stats = np.asarray(stats, np.float64)
    return {str(layer): {"mean": float(stats[layer, 0]), "max": float(stats[layer, 1])} for layer in layers}


def projection_summary(record: dict) -> str:
    """The progress bar's view: the mean over layers of the mean |h . q|, and the largest max."""
    means = [v["mean"] for v in record.values()]
    return f"{np.mean(means):.3g}/{max(v['max'] for v in record.values()):.3g}"


def final_loss(losses: list[float], window: int) -> float:
    """Mean loss of the last ``window`` steps (an epoch's worth gives a less noisy number than the last step)."""
    return float(np.mean(losses[-max(1, window) :]))
