"""Checkpointing of CAFT runs: train state, ablation projector and run metadata, through orbax.

One checkpoint is one orbax step directory ``<directory>/<step>/`` holding three Composite items:

* ``state``: the TrainState pytree (step, trainable, opt_state, rng) as sharded arrays (``StandardSave``);
* ``projector``: the intervention's arrays (``basis``, ``offset`` and, when set, ``strength``, ``steer``,
  ``steer_coeff``; absent when there is none);
* ``meta``: JSON ``{step, data_position, config, projector: {site, gradient, positions} | None, rng_impl,
  caft_jax_version}``.

The frozen base model is never saved (it is reloaded from its source). Saves are asynchronous by default: orbax
copies the arrays to host memory before ``save`` returns (so the caller may donate the state to the next step at
once) and writes them in a background thread into ``<step>.orbax-checkpoint-tmp``, renamed to ``<step>`` and
marked with ``commit_success.txt`` only when complete, so a process killed mid-save never leaves a step that
``latest_step`` or ``restore`` would pick. Restoring reads onto the shardings carried by an abstract state
(``jax.ShapeDtypeStruct(..., sharding=...)``, e.g. ``CaftTrainer.abstract_state()``), so a checkpoint saved on
one mesh restores onto another mesh or device count.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from caft_jax.errors import CheckpointError, ConfigError
from caft_jax.projector import Projector
from caft_jax.train_step import TrainState

STATE, PROJECTOR, META = "state", "projector", "meta"
PROJECTOR_STATIC = ("site", "gradient", "positions")


def projector_arrays(projector: Projector) -> dict:
    """The intervention's array fields that are set (checkpoints written before strength/steering had two)."""
    names = ("basis", "offset", "strength", "steer", "steer_coeff")
    return {name: getattr(projector, name) for name in names if getattr(projector, name) is not None}


def projector_static(projector: Projector) -> dict:
    return {name: getattr(projector, name) for name in PROJECTOR_STATIC}


COMMIT_FILE = "commit_success.txt"  # orbax writes it before the final rename (or as the commit, on GCS)


def _version() -> str:
    try:
        return importlib.metadata.version("caft_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path) -> str:
    names = (getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))) for p in path)
    return "/".join(str(n) for n in names)


def _leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a/b/c": (shape, dtype)} for every array leaf (orbax metadata, arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves if hasattr(x, "shape")}


def _placement(abstract_state: TrainState):
    """Replicated sharding on the abstract state's mesh (or its single device) for unsharded leaves."""
    for leaf in jax.tree.leaves(abstract_state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
        if sharding is not None:
            return SingleDeviceSharding(min(sharding.device_set, key=lambda d: d.id))
    return SingleDeviceSharding(jax.devices()[0])


class CheckpointManager:
    """Periodic, asynchronous, keep-the-last-K checkpoints of a CAFT run (a thin layer over orbax's manager).

    Args:
      directory: root directory (local path or any path orbax accepts, e.g. ``gs://...``); created if missing.
      save_every: ``save`` writes only at steps that are multiples of this (or when forced).
      keep: number of most recent checkpoints kept; older ones are deleted after each save.
      async_save: write in a background thread (``save`` returns once the arrays are copied to host).
    """

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ConfigError(f"checkpoint save_every={save_every} and keep={keep} must both be >= 1.")
        self.save_every, self.keep, self.async_save = int(save_every), int(keep), bool(async_save)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            PROJECTOR: ocp.StandardCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        }
        directory = os.fspath(directory)
        if "://" not in directory:  # orbax's tensorstore paths must be absolute
            directory = os.path.abspath(directory)
        self._mgr = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        self.directory = self._mgr.directory

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def _committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).exists()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the directory, ascending."""
        return sorted(s for s in self._mgr.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (half-written ones are ignored), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def is_due(self, step: int, force: bool = False) -> bool:
        """Whether ``save(step, ..., force=force)`` would write a checkpoint."""
        return force or int(step) % self.save_every == 0

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints newer than ``step`` (a resume from an earlier step abandons them); returns them."""
        self.wait()
        newer = [s for s in self._mgr.all_steps() if s > step]
        for s in newer:
            self._mgr.delete(s)
        return newer

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's background resources."""
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- save --------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: TrainState,
        *,
        projector: Projector | None = None,
        data_position: dict | None = None,
        config: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Save `state` (and the projector and metadata) as checkpoint `step` when it is due.

        Only call it with a finite state (the train step reports ``finite``). Returns True when a save was
        started, False when the step is not a multiple of ``save_every`` (and not forced) or already saved.

        Raises:
          CheckpointError: metadata that is not JSON-serialisable, or an incomplete directory for this step.
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        if step in self._mgr.all_steps():
            if self._committed(step):
                return False
            raise CheckpointError(
                f"{self.directory / str(step)} exists but is not a complete checkpoint; delete it and save again."
            )
        rng_impl = None
        if _is_key(state.rng):
            rng_impl = str(jax.random.key_impl(state.rng))
            state = state.replace(rng=jax.random.key_data(state.rng))
        meta = {
            "step": step,
            "data_position": data_position or {},
            "config": config or {},
            "projector": None if projector is None else projector_static(projector),
            "rng_impl": rng_impl,
            "caft_jax_version": _version(),
        }
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint metadata is not JSON-serialisable ({e}); pass plain dicts of str/int/float/bool/lists."
            ) from e
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        if projector is not None:
            items[PROJECTOR] = ocp.args.StandardSave(projector_arrays(projector))
        return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))

    # ---- restore -----------------------------------------------------------------------------------------
    def restore(
        self, step: int | None, abstract_state: TrainState
    ) -> tuple[TrainState, Projector | None, dict[str, Any]]:
        """Restore checkpoint `step` (None: the latest) onto the shapes and shardings of `abstract_state`.

        Returns (state, projector or None, metadata dict). The projector is placed replicated on the abstract
        state's mesh (or on its device).

        Raises:
          CheckpointError: no (complete) checkpoint, or one whose tree does not match `abstract_state`.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint found in {self.directory}; check the checkpoint directory or start without resuming."
            )
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory}; available steps are {steps}."
            )
        step = int(step)
        rep = _placement(abstract_state)

        def target(x):
            if _is_key(x):
                x = jax.eval_shape(jax.random.key_data, x)
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or rep)

        typed_rng = _is_key(abstract_state.rng)
        abstract = jax.tree.map(target, abstract_state)
        try:
            stored = self._mgr.item_metadata(step)
        except Exception as e:  # unreadable or foreign metadata
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has unreadable metadata ({type(e).__name__}: {e}); "
                "resume from another step or delete this one."
            ) from e
        self._check_match(step, stored[STATE].tree, abstract)
        items = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
        if stored.get(PROJECTOR) is not None:
            items[PROJECTOR] = ocp.args.StandardRestore(
                {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep) for k, v in stored[PROJECTOR].tree.items()}
            )
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises ValueError / FileNotFoundError / tensorstore errors
            first_line = (str(e).splitlines() or [""])[0]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored ({type(e).__name__}: {first_line}); "
                "check that it matches the run or resume from another step."
            ) from e
        state, meta = out[STATE], dict(out[META])
        if typed_rng:
            state = state.replace(rng=jax.random.wrap_key_data(state.rng, impl=meta.get("rng_impl") or "threefry2x32"))
        projector = None
        if PROJECTOR in items:
            projector = Projector(**out[PROJECTOR], **(meta.get("projector") or {}))
        return state, projector, meta

    def _check_match(self, step: int, stored_tree, abstract: TrainState) -> None:
        """Name the first differences between the stored state tree and the requested one, as one error."""
        have, want = _leaf_table(stored_tree), _leaf_table(abstract)
        problems = [(k, f"{k} is missing from the checkpoint") for k in want if k not in have]
        problems += [(k, f"{k} is in the checkpoint but not in the run") for k in have if k not in want]
        problems += [
            (k, f"{k} is stored as {have[k][1]}{list(have[k][0])} but the run expects {want[k][1]}{list(want[k][0])}")
            for k in want
            if k in have and have[k] != want[k]
        ]
        # Trainable leaves first: they name the cause (rank, targets, dtype); optimiser moments only mirror them.
        problems = [msg for _, msg in sorted(problems, key=lambda p: not p[0].startswith("trainable/"))]
        if problems:
            more = f" (and {len(problems) - 2} more differences)" if len(problems) > 2 else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the run's train state: "
                f"{'; '.join(problems[:2])}{more}; resume with the same model, LoRA rank/targets and trainable "
                "dtype as the checkpoint, or start a fresh run in another directory."
            )
