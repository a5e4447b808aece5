"""A checkpoint on disk, whole or not at all, its files proven to belong together, and nothing in it able to run
code: written through a hidden staging folder renamed into place, removed by renaming away first, pruned by the
limits, and checked before any model loads.

`checkpoint-N/` holds `pytorch_lora_weights.safetensors` and, in the newest checkpoint(s), `resume/`:
- accelerate's `save_state`: `optimizer.bin`, `random_states_<process>.pkl` (every process's RNG states) and, in
  fp16, `scaler.pt`. These are torch pickles; they are only ever read with `weights_only=True` (tensors and plain
  values, never code), first here before any model loads, then by accelerate itself;
- `progress.safetensors`: the step and every process's data order (tensors and string metadata, no pickle);
- `manifest.json`: the step, the SHA-256 of the weights file the state was saved with, and the SHA-256 of every
  other file of `resume/`. A file of another checkpoint, or of another step, does not match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.text_files import parse_json, read_json
from tlora.common.values import shown
from tlora.runs.reading import read
from tlora.runs.run_folder import RunFolder, checkpoint_step

RESUME_DIR = "resume"
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.safetensors"
MANIFEST_FORMAT = "tlora-resume-1"
PICKLES = (".bin", ".pkl", ".pt")  # accelerate's files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------------------------
class Progress:
    """What accelerate's save_state does not hold: the step and every process's data order, saved as
    `progress.safetensors` (each process's loader generator state as a tensor, the rest as metadata)."""

    def __init__(self, order, accelerator) -> None:
        self.order, self.accelerator = order, accelerator
        self.step = 0
        self._orders: list[dict] = []

    def gather(self) -> None:
        """Collect every process's data order (call on every process before saving)."""
        from accelerate.utils import gather_object

        local = [self.order.state_dict()]
        self._orders = gather_object(local) if self.accelerator.num_processes > 1 else local

    def save(self, folder: Path) -> None:
        """Write progress.safetensors into `folder` (main process)."""
        tensors = {f"generator.{i}": order["generator"] for i, order in enumerate(self._orders)}
        metadata = {"step": str(self.step), "taken": json.dumps([order["taken"] for order in self._orders])}
        atomic_write(folder / PROGRESS_NAME, save(tensors, metadata=metadata))

    def load(self, folder: Path) -> None:
        """This process's data order and the step from a checked progress.safetensors (see `why_not_resumable`)."""
        step, orders = read_progress(folder / PROGRESS_NAME)
        self.step = step
        self.order.load_state_dict(orders[self.accelerator.process_index])


def _write_manifest(state: Path, step: int, weights: Path) -> None:
    files = {p.name: sha256(p) for p in sorted(state.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "weights": {"file": weights.name, "sha256": sha256(weights)},
                "files": files}
    atomic_write(state / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class CheckpointExists(FileExistsError):
    """The checkpoint folder to write exists already: a finished checkpoint is never replaced."""


class FailedElsewhere(OSError):
    """Writing the checkpoint failed on another process (which reports why); this one stops too."""


def _together(accelerator, work, main_only: bool = False) -> None:
    """Run `work()` on every process (or the main one); when it fails anywhere, every process raises (its own
    error, or FailedElsewhere), so that none waits for ever at the next collective call."""
    from accelerate.utils import gather_object

    error = None
    if accelerator.is_main_process or not main_only:
        try:
            work()
        except Exception as err:  # raised below, once every process knows
            error = err
    failed = gather_object([error is not None]) if accelerator.num_processes > 1 else [error is not None]
    if error is not None:
        raise error
    if any(failed):
        raise FailedElsewhere("writing the checkpoint failed on another process")


def write_checkpoint(accelerator, progress: Progress, folder: Path, write_weights) -> Path:
    """checkpoint-N whole or not at all: `write_weights(staging)` (main process, returns the weights file),
    accelerate's save_state (every process), the progress and the manifest go into a hidden staging folder, which
    is renamed to `folder` when complete. An existing `folder` is never replaced (CheckpointExists). A failure on
    the main process stops every process."""
    staging, written = folder.with_name(f".{folder.name}.tmp"), {}

    def begin() -> None:
        if folder.exists():
            raise CheckpointExists(f"{folder} exists already; a finished checkpoint is never replaced")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / RESUME_DIR).mkdir(parents=True)
        written["weights"] = write_weights(staging)

    def finish() -> None:
        progress.save(staging / RESUME_DIR)
        _write_manifest(staging / RESUME_DIR, progress.step, written["weights"])
        _fsync_tree(staging / RESUME_DIR)
        os.replace(staging, folder)

    progress.gather()
    try:
        _together(accelerator, begin, main_only=True)
        _together(accelerator, lambda: accelerator.save_state(str(staging / RESUME_DIR)))
        _together(accelerator, finish, main_only=True)
    except CheckpointExists:
        raise
    except Exception:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk: give back what the half checkpoint took
        raise
    return folder


def remove(folder: Path) -> None:
    """Delete a folder so that it is gone or whole at any moment: renamed away first, then removed."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.removing")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def prune(run: Path, keep_checkpoints: int | None, keep_states: int) -> None:
    """Keep the newest `keep_checkpoints` checkpoint folders and resume state in the newest `keep_states`;
    sweep what a killed process left half-written or half-removed (call when no save is in progress)."""
    leftovers = [*run.glob(".*.removing"), *run.glob(".*.tmp"), *run.glob("checkpoint-*/.*.removing"),
                 *run.glob("checkpoint-*/.*.tmp")]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    found = RunFolder(run).checkpoints()
    if keep_checkpoints is not None:
        for _, folder in found[:-keep_checkpoints]:
            remove(folder)
        found = found[-keep_checkpoints:]
    with_state = [folder for _, folder in found if (folder / RESUME_DIR).is_dir()]
    for folder in with_state[:-keep_states]:
        remove(folder / RESUME_DIR)


# -- checking, before any model loads ------------------------------------------------------------------------------
class NotResumable(Exception):
    """Why a checkpoint's resume state cannot be used: a reason only; the caller says what to do about it."""


def read_progress(path: Path) -> tuple[int, list[dict]]:
    """(step, every process's data order) from progress.safetensors; NotResumable when it is not one (each generator
    state is one a torch.Generator takes, each count of batches taken a whole number >= 0)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step, taken = int(metadata["step"]), parse_json(metadata["taken"])
        orders = [{"generator": tensors[f"generator.{i}"], "taken": n} for i, n in enumerate(taken)]
        for order in orders:
            torch.Generator().set_state(order["generator"])
    except Exception:  # safetensors' own error type, a missing key, a state no generator takes
        step, orders = -1, []  # refused just below, as a bad count is
    if step < 0 or not orders or any(type(o["taken"]) is not int or o["taken"] < 0 for o in orders):
        raise NotResumable(f"{path} is not a progress file of tlora's")
    return step, orders


def read_manifest(state: Path) -> dict:
    path = state / MANIFEST_NAME
    if not path.is_file():
        raise NotResumable(f"{path} is missing (resume state written by an older tlora or another tool)")
    try:
        manifest = read_json(path, "resume state", "start a new run")  # its words are replaced below
        files, weights = manifest["files"], manifest["weights"]
        ok = (manifest["format"] == MANIFEST_FORMAT and type(manifest["step"]) is int and isinstance(files, dict)
              and isinstance(weights["sha256"], str) and isinstance(weights["file"], str)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()))
    except (UsageError, KeyError, TypeError):  # not UTF-8 JSON, not an object, keys missing or of other types
        ok = False
    if not ok:
        raise NotResumable(f"{path} is not a manifest of tlora's resume state")
    return manifest


def _loads_safely(path: Path) -> object:
    """A torch pickle read as accelerate reads it, with weights_only: tensors and plain values, never code."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # the unpickler refuses anything but tensors and plain containers
        raise NotResumable(f"{path} is not a torch file of tensors and plain values (damaged, or a pickle that could "
                         "run code, which is never loaded)") from None


def _check_rng_states(path: Path, states: object) -> None:
    """An RNG file's states are ones Python's, numpy's and torch's generators take (accelerate's load_state skips a
    state it cannot set without a word, which would make the resume inexact)."""
    import random

    import numpy as np

    try:
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception:  # a missing key, a state of another shape or type
        raise NotResumable(f"{path} does not hold the RNG states accelerate saves") from None


def _check_state(checkpoint: Path, weights: Path) -> None:
    """Every file of checkpoint/resume is listed in its manifest with its digest, of this step and these weights;
    accelerate's pickles load without running code; the progress is of this step."""
    state, step = checkpoint / RESUME_DIR, checkpoint_step(checkpoint)
    manifest = read_manifest(state)
    if manifest["weights"]["file"] != weights.name:
        raise NotResumable(f"{state / MANIFEST_NAME} is of a checkpoint whose weights are "
                         f"{shown(manifest['weights']['file'])}, not {weights.name}")
    if manifest["step"] != step:
        raise NotResumable(f"{state / MANIFEST_NAME} is step {manifest['step']}'s, not {checkpoint.name}'s")
    if manifest["weights"]["sha256"] != sha256(weights):
        raise NotResumable(f"{weights} is not the weights {state} was saved with (its digest differs)")
    present = {p.name for p in state.iterdir()} - {MANIFEST_NAME}
    for name in sorted(present - set(manifest["files"])):
        raise NotResumable(f"{state / name} is not one of the checkpoint's files (its manifest does not list it)")
    for name, digest in sorted(manifest["files"].items()):
        path = state / name
        if Path(name).name != name or not path.is_file():
            raise NotResumable(f"{path} is missing")
        if sha256(path) != digest:
            raise NotResumable(f"{path} is not the file {checkpoint.name} saved (damaged, or another checkpoint's: its "
                             "digest differs from its manifest's)")
    for name in sorted(manifest["files"]):
        if name.endswith(PICKLES):
            loaded = _loads_safely(state / name)
            if name.startswith("random_states_"):
                _check_rng_states(state / name, loaded)
    if PROGRESS_NAME not in manifest["files"]:
        raise NotResumable(f"{state / PROGRESS_NAME} is missing")
    saved, orders = read_progress(state / PROGRESS_NAME)
    if saved != step:
        raise NotResumable(f"{state / PROGRESS_NAME} is of step {saved}, not {step}")
    for i in range(len(orders)):
        if f"random_states_{i}.pkl" not in manifest["files"]:
            raise NotResumable(f"{state / f'random_states_{i}.pkl'} is missing")


def why_not_resumable(checkpoint: Path) -> str | None:
    """What keeps a checkpoint from being resumed exactly (its weights, or resume state that is missing, damaged,
    of another checkpoint or able to run code), read without loading any model; None when it can be."""
    try:
        ckpt = read(checkpoint, quiet=True)  # its weights file; safetensors checks the header against the file
        weights, step = ckpt.path, checkpoint_step(checkpoint)
        if ckpt.metadata.get("global_step", str(step)) != str(step):
            return f"{weights} is step {ckpt.metadata['global_step']}'s weights, not {checkpoint.name}'s"
        if not (checkpoint / RESUME_DIR).is_dir():
            return f"{checkpoint} has no resume state ({RESUME_DIR}/)"
        _check_state(checkpoint, weights)
        ckpt.tensors()  # floating point and finite
    except (UsageError, NotResumable) as err:
        return str(err)
    except OSError as err:
        return f"{checkpoint} cannot be read ({err.strerror or err})"
    return None
