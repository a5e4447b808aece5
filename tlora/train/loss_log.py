"""The loss, as training reports it: kept on the device, read back every LOSS_FLUSH_STEPS steps (and at
checkpoints and stops) for the trackers, `logs/loss.csv` and the progress bar, and checked to be finite there,
so that checking never adds a host sync to a step."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tlora.common.errors import Diverged, UsageError
from tlora.common.files import atomic_write
from tlora.common.messages import DIVERGED_FIX
from tlora.common.text_files import read_text
from tlora.common.values import shown

LOSS_FLUSH_STEPS = 10


class LossLog:
    """Losses of the steps since the last read-back, and every value read back so far (`values`)."""

    def __init__(self, accelerator, loss_csv: Path, last_good) -> None:
        self.accelerator, self.loss_csv, self.last_good = accelerator, loss_csv, last_good
        self.bar = None  # the progress bar that shows the newest loss, when there is one
        self.pending: list[torch.Tensor] = []
        self.values: list[float] = []

    def add(self, loss: torch.Tensor, step: int, now: bool = False) -> None:
        """Keep a step's loss (detached, on the device); read the pending ones back every LOSS_FLUSH_STEPS
        steps or when `now`."""
        self.pending.append(loss)
        if now or step % LOSS_FLUSH_STEPS == 0:
            self.flush(step)

    def flush(self, last_step: int) -> None:
        """Read back the pending losses (the mean over processes), report them, and stop the run (Diverged) when
        one is not a finite number, after it is recorded."""
        if not self.pending:
            return
        acc = self.accelerator
        stacked = torch.stack(self.pending).float()
        self.pending = []
        if acc.num_processes > 1:
            stacked = acc.gather(stacked).reshape(acc.num_processes, -1).mean(0)
        values = stacked.cpu().tolist()
        first = last_step - len(values) + 1
        for i, value in enumerate(values):
            acc.log({"loss": value}, step=first + i)
        if acc.is_main_process:
            header = "" if self.loss_csv.exists() else "step,loss\n"
            with open(self.loss_csv, "a") as f:
                f.write(header + "".join(f"{first + i},{v}\n" for i, v in enumerate(values)))
        self.values.extend(values)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values[-1]:.4f}")
        bad = next(((first + i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise Diverged(f"training diverged: the loss is {bad[1]} at step {bad[0]}; {self.last_good()}; "
                           f"{DIVERGED_FIX}")

    def keep_until(self, last_step: int) -> None:
        """Drop rows after `last_step` from loss.csv (written after the checkpoint a run resumes from, or torn)."""
        rows = [(step, loss) for step, loss in read_loss_log(self.loss_csv) if step <= last_step]
        if self.loss_csv.is_file():
            atomic_write(self.loss_csv, ("step,loss\n" + "".join(f"{step},{loss}\n" for step, loss in rows)).encode())


def read_loss_log(path: Path, fix: str = "move it out of the run folder (training starts a new one)"
                  ) -> list[tuple[int, float]]:
    """(step, loss) of each row of a run's loss.csv ([] when there is none). A last row cut short (the disk
    filled while it was appended) is left out; any other row that is not a step and a loss is one line."""
    if not path.is_file():
        return []
    lines = read_text(path, "loss log", fix).splitlines()
    if lines[:1] == ["step,loss"]:
        lines = lines[1:]
    rows = []
    for i, line in enumerate(lines):
        step, _, loss = line.partition(",")
        try:
            rows.append((int(step), float(loss)))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise UsageError(f"{path} is not a loss log (a row reads {shown(line)}); {fix}") from None
    return rows
