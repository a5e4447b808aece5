"""A checkpoint on disk, whole or not at all: written through a hidden staging folder renamed into place,
removed by renaming away first, pruned by the limits; its resume state (accelerate's save_state plus the
`Progress`) checked without unpickling anything.

`checkpoint-N/` holds `pytorch_lora_weights.safetensors` and, in the newest checkpoint(s), `resume/`:
accelerate's `save_state` (optimizer, grad scaler, the RNG states of every process) plus
`custom_checkpoint_0.pkl` (the `Progress`: step and every process's data order).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.runs.reading import read, weights_file
from tlora.runs.run_folder import CHECKPOINT, checkpoints

RESUME_DIR = "resume"

STATE_FILES = ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")  # accelerate's save_state


def checkpoint_step(checkpoint: Path) -> int:
    """N of checkpoint-N."""
    return int(CHECKPOINT.match(checkpoint.name).group(1))


def is_resumable(checkpoint: Path) -> bool:
    """Whether a checkpoint has weights and resume state (whole or not: see `damage`)."""
    return weights_file(checkpoint) is not None and (checkpoint / RESUME_DIR).is_dir()


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's weights or resume state, read without loading any model; None when whole.
    Every file of resume/ is a zip archive (torch.save) whose checksums are tested; nothing is unpickled."""
    try:
        read(checkpoint, quiet=True)  # safetensors checks that its header's tensors fill the file
    except UsageError as err:
        return str(err)
    state = checkpoint / RESUME_DIR
    for name in STATE_FILES:
        if not (state / name).is_file():
            return f"{state / name} is missing"
    for path in sorted(p for p in state.iterdir() if p.is_file()):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"{path} is damaged ({err})"
        if bad is not None:
            return f"{path} is damaged ({bad} fails its checksum)"
    return None


def newest_whole(run: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run with whole weights and resume state, and what is wrong with newer ones."""
    skipped = []
    for _, folder in reversed(checkpoints(run)):
        if not is_resumable(folder):
            continue
        problem = damage(folder)
        if problem is None:
            return folder, skipped
        skipped.append(problem)
    return None, skipped


class Progress:
    """What accelerate's save_state does not hold: the step and every process's data order."""

    def __init__(self, order, accelerator) -> None:
        self.order, self.accelerator = order, accelerator
        self.step = 0
        self._orders: list[dict] = []

    def gather(self) -> None:
        """Collect every process's data order (call on every process before save_state)."""
        from accelerate.utils import gather_object

        local = [self.order.state_dict()]
        self._orders = gather_object(local) if self.accelerator.num_processes > 1 else local

    def state_dict(self) -> dict:
        return {"step": self.step, "orders": self._orders}

    def load_state_dict(self, state: dict) -> None:
        if len(state["orders"]) != self.accelerator.num_processes:
            raise UsageError(f"--resume_from_checkpoint: the run was trained with {len(state['orders'])} processes, "
                             f"not {self.accelerator.num_processes}; resume with as many")
        self.step = state["step"]
        self.order.load_state_dict(state["orders"][self.accelerator.process_index])


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_checkpoint(accelerator, progress: Progress, folder: Path, write_weights) -> Path:
    """checkpoint-N whole or not at all: `write_weights(staging)` (main process) and accelerate's save_state
    (every process) go into a hidden staging folder, which is renamed to `folder` when complete."""
    staging = folder.with_name(f".{folder.name}.tmp")
    progress.gather()
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / RESUME_DIR).mkdir(parents=True)
            write_weights(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging / RESUME_DIR))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(staging / RESUME_DIR)
            remove(folder)  # a checkpoint of this step left by an earlier, resumed attempt
            os.replace(staging, folder)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk: give back what the half checkpoint took
        raise
    accelerator.wait_for_everyone()
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
    found = checkpoints(run)
    if keep_checkpoints is not None:
        for _, folder in found[:-keep_checkpoints]:
            remove(folder)
        found = found[-keep_checkpoints:]
    with_state = [folder for _, folder in found if (folder / RESUME_DIR).is_dir()]
    for folder in with_state[:-keep_states]:
        remove(folder / RESUME_DIR)
