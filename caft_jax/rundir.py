"""The run-directory contract: what may be written into an output directory, and what a resume must match.

A run directory holds ``manifest.json``: the recipe (every resolved value), the model's identity (its path and a
fingerprint of its config and weights) and the content hashes of the input files it read. Then:

* a non-empty directory is refused unless the user says ``resume`` (continue it) or ``overwrite`` (start over);
* ``resume`` with nothing to resume is an error, and so is a request that differs from the manifest: the error
  names every differing key, so a resume can never silently mix two runs.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

from caft_jax import jsonio
from caft_jax.errors import ConfigError

MANIFEST = "manifest.json"
# Bytes hashed at each end of a large weight file: enough to tell checkpoints apart, cheap for a 60 GB model.
EDGE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz")


class RunDirError(ConfigError):
    """The output directory cannot be used as requested (occupied, nothing to resume, or another run's)."""


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's whole content (for data files and the small inputs a run references by path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_digest(path: pathlib.Path) -> str:
    """Size plus the first and last MiB of a weight file: changes whenever the checkpoint does, in milliseconds."""
    size = path.stat().st_size
    if size <= 2 * EDGE_BYTES:
        return file_digest(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def model_fingerprint(model_path: str) -> dict:
    """{"path", "fingerprint"} of a model directory or file (config.json, tokenizer files and weights)."""
    path = pathlib.Path(model_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json")
        )
    else:  # a hub id: the loader resolves (or refuses) it; its name is all there is to compare here
        return {"path": model_path, "fingerprint": None}
    digest = hashlib.sha256()
    for p in files:
        part = _weights_digest(p) if p.suffix in WEIGHT_SUFFIXES else file_digest(p)
        digest.update(f"{p.name}:{part}\n".encode())
    return {"path": str(path.resolve()), "fingerprint": digest.hexdigest()}


def build_manifest(recipe: dict, model_path: str, inputs: dict[str, str]) -> dict:
    """The manifest of a run: ``inputs`` maps a recipe key (e.g. "data.train") to the file it names."""
    return {
        "recipe": recipe,
        "model": model_fingerprint(model_path),
        "inputs": {key: file_digest(p) for key, p in sorted(inputs.items()) if p and os.path.isfile(p)},
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def manifest_differences(stored: dict, requested: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two manifests ("optim.lr: 1e-05 in the run, 2e-05 requested")."""
    problems = []
    have, want = _flatten(stored.get("recipe", {})), _flatten(requested.get("recipe", {}))
    for key in sorted(set(have) | set(want)):
        if key in ignore or have.get(key) == want.get(key):
            continue
        problems.append(f"{key}: {have.get(key)!r} in the run, {want.get(key)!r} requested")
    if stored.get("model", {}).get("fingerprint") != requested.get("model", {}).get("fingerprint"):
        problems.append(f"the model's config or weights differ from the run's ({stored.get('model', {}).get('path')})")
    old_inputs, new_inputs = stored.get("inputs", {}), requested.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            problems.append(f"the content of {key} differs from the file the run used")
    return problems


def prepare(
    out_dir: pathlib.Path, *, resume: bool, overwrite: bool, flags: tuple[str, str] = ("--resume", "--overwrite")
):
    """Check that ``out_dir`` may be used; with ``overwrite`` empty it first. Returns whether it holds a run.

    Raises RunDirError for a non-empty directory without ``resume``/``overwrite``, for both at once, and for
    ``resume`` on a directory without a manifest.
    """
    resume_flag, overwrite_flag = flags
    if resume and overwrite:
        raise RunDirError(f"{resume_flag} and {overwrite_flag} contradict each other; pass one of them.")
    occupied = out_dir.is_dir() and any(out_dir.iterdir())
    if occupied and overwrite:
        shutil.rmtree(out_dir)
        occupied = False
    if resume and not (out_dir / MANIFEST).is_file():
        raise RunDirError(
            f"{resume_flag}: {out_dir} holds no run to resume (no {MANIFEST}); drop {resume_flag} to start a fresh run."
        )
    if occupied and not resume:
        raise RunDirError(
            f"{out_dir} already holds files of another run; pass {resume_flag} to continue it, {overwrite_flag} to "
            "delete it and start over, or choose another output directory."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return resume


def claim_files(
    out_dir: pathlib.Path, names, *, overwrite: bool, flag: str = "--overwrite", create: bool = True
) -> pathlib.Path:
    """For one-shot commands that add named files to a shared folder: refuse (RunDirError) when any of ``names``
    already exists there, unless ``overwrite``; creates the folder unless ``create`` is False (a command that may
    still refuse its other arguments checks first and claims once they pass). Nothing is deleted here: the files
    are replaced only when the command writes its results."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} is a file, not a directory; choose another output directory.")
    existing = sorted(name for name in names if (out_dir / name).exists())
    if existing and not overwrite:
        raise RunDirError(
            f"{out_dir} already holds {', '.join(existing)} from an earlier run; pass {flag} to replace "
            f"{'it' if len(existing) == 1 else 'them'}, or choose another output directory."
        )
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def check_resume(out_dir: pathlib.Path, requested: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise RunDirError naming every difference between the run's manifest and ``requested``."""
    stored = jsonio.read_json(out_dir / MANIFEST)
    problems = manifest_differences(stored, requested, ignore)
    if problems:
        raise RunDirError(
            f"cannot resume {out_dir}: the request differs from the run: {'; '.join(problems)}. Rerun with the run's "
            "settings, or pass --overwrite (or another output directory) to start a new run."
        )


def write_manifest(out_dir: pathlib.Path, manifest: dict) -> None:
    jsonio.write_json(out_dir / MANIFEST, manifest)
