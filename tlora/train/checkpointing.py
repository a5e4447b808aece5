"""Writing checkpoint-N during training: only finite adapters (else the run stops, Diverged), the same on
every process, whole or not at all (runs.checkpoint_state), then pruned to the limits."""

from __future__ import annotations

from pathlib import Path

import torch

from tlora.common.errors import Diverged, RunFailed
from tlora.common.files import is_write_failure, write_failure
from tlora.common.messages import DIVERGED_FIX, resume_with
from tlora.runs.checkpoint_state import CheckpointExists, FailedElsewhere, prune, write_checkpoint
from tlora.runs.run_folder import RunFolder, checkpoint_name, weights_file
from tlora.runs.weights import save_weights


class Checkpointer:
    """Writes `<run>/checkpoint-<step>` with the adapters (metadata from their settings) and the resume state."""

    def __init__(self, accelerator, folder: Path, tlora, progress, metadata: dict, opts) -> None:
        self.accelerator, self.folder, self.tlora, self.progress = accelerator, folder, tlora, progress
        self.metadata, self.opts = metadata, opts

    def save(self, step: int) -> Path:
        """checkpoint-<step>: weights and resume state; older checkpoints and states beyond the limits go once
        it is complete."""
        self.check_finite(step)
        self.check_replicas()
        meta, name = self.metadata | {"global_step": step}, checkpoint_name(step)
        try:
            folder = write_checkpoint(self.accelerator, self.progress, RunFolder(self.folder).checkpoint(step),
                                      lambda staging: save_weights(self.tlora.state_dict(), staging, meta))
        except FailedElsewhere as err:
            raise RunFailed(f"could not write {name} (another process says why); {self.kept_whole()}") from err
        except CheckpointExists as err:
            raise RunFailed(f"{name} appeared in {self.folder} while training and is kept as it is; move "
                            f"it out of the run folder and {resume_with(self.folder)}") from err
        except (OSError, RuntimeError) as err:  # a full disk (torch.save says "file write failed"), a folder gone
            if not is_write_failure(err):
                raise
            raise RunFailed(f"could not write {name}: {write_failure(err, self.folder)}; "
                            f"{self.kept_whole('free some space and ')}") from err
        if self.accelerator.is_main_process:
            prune(self.folder, self.opts.checkpoints_total_limit, self.opts.resume_state_total_limit)
        return folder

    def kept_whole(self, first: str = "") -> str:
        """The end of a message for a checkpoint not written: the others are whole, so resuming is the fix (after
        `first`, e.g. "free some space and ")."""
        return f"every finished checkpoint is whole: {first}{resume_with(self.folder)}"

    def last_good(self) -> str:
        return last_good(self.folder)

    def check_finite(self, step: int) -> None:
        """The adapters hold finite numbers (one reduction, at checkpoints only); else stop before writing."""
        params = self.tlora.trainable_parameters()
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise Diverged(f"training diverged: the adapter weights are not finite after step {step}; "
                           f"{self.last_good()}; {DIVERGED_FIX}")

    def check_replicas(self) -> None:
        """Every process must hold the same adapters (DDP averages gradients); a mismatch is a bug."""
        if self.accelerator.num_processes == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in self.tlora.trainable_parameters()]).sum()
        sums = self.accelerator.gather(total[None].to(self.accelerator.device))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"adapters differ between processes: {sums.tolist()}")


def last_good(run: Path) -> str:
    """Where a run's newest finite checkpoint is (every checkpoint training writes is finite)."""
    found = [folder for _, folder in RunFolder(run).checkpoints() if weights_file(folder)]
    return f"the newest finite checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
