"""Entry points of every command: bad input is one `error:` line with exit code 2, before any model loads;
a clean stop on a signal is one line with exit code 130 (SIGINT) or 143 (SIGTERM); a run that cannot go on
(it diverged, the disk filled, ...) and any other fault are one `error:` line with exit code 1 (the traceback,
if any, in a file the line names).

Also `python -m tlora.cli train|inference ...`.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

from .usage import AssumedSetting, UsageError, first_line


def run_command(parse: Callable[[list[str] | None], Any], run: Callable[[Any], Any], label: str | None,
                argv: list[str] | None) -> int:
    """Parse and check, then run; print `label: result` when a label is given."""
    from .stopping import Interrupted, RunFailed

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", AssumedSetting)
            warnings.showwarning = _note(warnings.showwarning)
            args = parse(argv)
            result = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        if _main_process():
            print(err, file=sys.stderr)
        return err.exit_code
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as err:  # a fault nobody foresaw: one line, the traceback in a file
        print(f"error: {type(err).__name__}: {first_line(err)} (traceback in {_save_traceback(err)})", file=sys.stderr)
        return 1
    if label and _main_process():
        print(f"{label}: {result}")
    return 0


def _save_traceback(err: BaseException) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="tlora-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(err)))
    return path


def _note(show: Callable) -> Callable:
    """showwarning that prints an AssumedSetting as one `note:` line (others as before)."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AssumedSetting):
            if _main_process():
                print(f"note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _main_process() -> bool:
    """Under torchrun / accelerate launch, only process 0 reports (RANK is unset in a single process)."""
    return os.environ.get("RANK", "0") == "0"


def train_main(argv: list[str] | None = None) -> int:
    from .options import parse_args

    def run(args):
        from .training import train  # heavy imports only after the input is known to be good

        return train(args)

    return run_command(parse_args, run, "run folder", argv)


def inference_main(argv: list[str] | None = None) -> int:
    from .inference import parse_args, run

    return run_command(parse_args, run, "samples", argv)


if __name__ == "__main__":
    commands = {"train": train_main, "inference": inference_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m tlora.cli train|inference [flags]")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
