"""The errors and notices every part of tlora raises: each is shown to the user as one line.

UsageError (and CheckpointError): bad input, exit code 2, before anything loads. Note (and AssumedSetting): what
the user should know before the work goes on, one `note:` line. RunFailed and its kinds: a run that cannot go on,
exit code 1 (130/143 for a signal). Interrupted: a clean stop after a resumable checkpoint.
"""

from __future__ import annotations

import signal
import warnings


class UsageError(ValueError):
    """Bad input from a flag, a config file or an API argument; the message is shown as is, on one line."""


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Note(UserWarning):
    """Something that changes what the user asked for, said before the work goes on (a value clamped, a flag
    with no effect here, a prompt cut, an older checkpoint used and why): commands show it as one `note:` line."""


class AssumedSetting(Note):
    """A setting that changes a T-LoRA's result is recorded nowhere, so a default was taken."""


def note(message: str, stacklevel: int = 2) -> None:
    """Say `message` as a Note (a `note:` line under every command; a Python warning in the API)."""
    warnings.warn(message, Note, stacklevel=stacklevel + 1)


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used here: damaged, or made for other settings."""


class Interrupted(Exception):
    """Training stopped on a signal after writing a complete, resumable checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted at step {step}; resume with --resume_from_checkpoint {checkpoint}")

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
