"""The errors every part of tlora raises: each is shown to the user as one line (notes: common/messages.py).

UsageError (and CheckpointError): bad input, exit code 2, before anything loads. RunFailed and its kinds: a run
that cannot go on, exit code 1 (130/143 for a signal). Interrupted: a clean stop after a resumable checkpoint.
"""

from __future__ import annotations

import signal

from tlora.common.messages import resume_with


class UsageError(ValueError):
    """Bad input from a flag, a config file or an API argument; the message is shown as is, on one line."""


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used here: damaged, or made for other settings."""


class Interrupted(Exception):
    """Training stopped on a signal after writing a complete, resumable checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted at step {step}; {resume_with(checkpoint)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class RunFailed(Exception):
    """Training could not go on (it diverged, the disk filled, the tracker refused, a bug): one line for the
    user, exit code 1; every checkpoint finished before is whole and kept."""

    exit_code = 1


class Diverged(RunFailed):
    """The loss or the adapter weights stopped being finite numbers."""


class Stopped(RunFailed):
    """A second Ctrl-C (or a Ctrl-C or SIGTERM before the first step) stopped training at once."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
