"""How every command ends: bad input is one `error:` line with exit code 2, before any model loads; a clean
stop on a signal is one line with exit code 130 (SIGINT) or 143 (SIGTERM); a run that cannot go on (it
diverged, the disk filled, ...) and any other fault are one `error:` line with exit code 1 (the traceback,
if any, in a file the line names). Notes (an assumed setting, a value changed) are `note:` lines."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from typing import Any, Callable

from tlora.common.errors import Interrupted, RunFailed, UsageError, first_line
from tlora.common.messages import main_process, notes_as_lines


def run_command(parse: Callable[[list[str] | None], Any], run: Callable[[Any], Any], label: str | None,
                argv: list[str] | None) -> int:
    """Parse and check, then run; print `label: result` when a label is given. Returns the exit code."""
    try:
        with notes_as_lines():
            args = parse(argv)
            result = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        if main_process():
            print(err, file=sys.stderr)
        return err.exit_code
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as err:  # a fault nobody foresaw: one line, the traceback in a file
        print(f"error: {type(err).__name__}: {first_line(err)} (traceback in {save_traceback(err)})", file=sys.stderr)
        return 1
    if label and main_process():
        print(f"{label}: {result}")
    return 0


def save_traceback(err: BaseException, path: str | None = None) -> str:
    """Write the traceback of `err` to `path` (default: a new temporary file); returns the path."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix="tlora-error-", suffix=".txt")
        os.close(fd)
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(err)))
    return str(path)


