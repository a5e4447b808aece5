"""Entry points of train.py and inference.py (also `python -m tlora.cli train|inference ...`)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from .options import UsageError


def _main(parse: Callable[[list[str] | None], Any], run: Callable[[Any], Any], label: str, argv: list[str] | None) -> int:
    """Parse (bad input: one `error:` line, exit code 2, nothing loaded), then run and print the result path."""
    try:
        args = parse(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{label}: {run(args)}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    from .options import parse_args

    def run(args):
        from .training import train  # heavy imports only after the input is known to be good

        return train(args)

    return _main(parse_args, run, "run folder", argv)


def inference_main(argv: list[str] | None = None) -> int:
    from .inference import parse_args, run

    return _main(parse_args, run, "samples", argv)


if __name__ == "__main__":
    commands = {"train": train_main, "inference": inference_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m tlora.cli train|inference [flags]")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
