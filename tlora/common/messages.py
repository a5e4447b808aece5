"""What tlora says to the user besides errors: notes, how a command shows them, and the texts several messages share.

A note is something that changes what the user asked for, said before the work goes on (a value clamped, a flag
with no effect here, a prompt cut, an older checkpoint used and why). The API raises it as a `Note` warning (an
`AssumedSetting` when a setting that changes the result was recorded nowhere); every command shows it as one
`note:` line, on the main process only.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Note(UserWarning):
    """Something the user should know before the work goes on; commands show it as one `note:` line."""


class AssumedSetting(Note):
    """A setting that changes a T-LoRA's result is recorded nowhere, so a default was taken."""


def note(message: str, stacklevel: int = 2) -> None:
    """Say `message` as a Note (a `note:` line under every command; a Python warning in the API)."""
    warnings.warn(message, Note, stacklevel=stacklevel + 1)


def main_process() -> bool:
    """Under torchrun / accelerate launch, only process 0 reports (RANK is unset in a single process)."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def notes_as_lines() -> Iterator[None]:
    """Inside, every Note is printed as one `note:` line on stderr (main process only), each time it is raised;
    other warnings are shown as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", Note)
        warnings.showwarning = _note_line(warnings.showwarning)
        yield


def _note_line(show: Callable) -> Callable:
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, Note):
            if main_process():
                print(f"note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


# -- texts several messages share ------------------------------------------------------------------------------
PASS_HPARAMS = "pass a run's logs/hparams.yml"
WRITABLE_FOLDER = "pass a folder you can write to"
NEW_PATH = "pass a new path, or --overwrite to replace it"
ALREADY_ATTACHED = "this model already has T-LoRA adapters; call unload() first"
DIVERGED_FIX = "lower --learning_rate (or set --max_grad_norm) and start a new run"
HUB_FIX = "pass a local folder or check the name and network"
DIFFUSERS_LAYOUT = "pass a model folder in diffusers layout"
UNREADABLE_IMAGE = "is not a readable image"
OWN_FAMILY = "load it on a pipeline of the family it was trained on"
RUN_WRITABLE = "make it writable (or copy the run to a folder you can write to)"


def resume_with(run: object) -> str:
    """The fix for a run stopped with whole checkpoints."""
    return f"resume with --resume_from_checkpoint {run}"
