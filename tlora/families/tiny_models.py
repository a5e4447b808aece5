"""Tiny random models of every family in diffusers' folder layout, built in seconds with no download (each family's
`tiny_model`: its published classes and wiring at toy sizes). For tests and the CPU demo.
`python -m tlora.tiny FOLDER [family]` writes one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tlora.families import FAMILIES

BUILDERS = {name: family.tiny_model for name, family in FAMILIES.items()}


def main(argv: list[str] | None = None) -> int:
    from tlora.common.commands import run_command
    from tlora.common.errors import UsageError
    from tlora.common.flags import Parser

    p = Parser(description="Write a tiny random model (diffusers layout) to FOLDER.")
    p.add_argument("folder", nargs="?", default=None, help="Default: tiny-<family>.")
    p.add_argument("family", nargs="?", default="sdxl", choices=sorted(BUILDERS))
    p.add_argument("--overwrite", action="store_true", default=False, help="Write into a folder that is not empty.")

    def parse(argv):
        args = p.parse_args(argv)
        args.folder = Path(args.folder or f"tiny-{args.family}")
        if args.folder.exists() and (not args.folder.is_dir() or any(args.folder.iterdir())) and not args.overwrite:
            raise UsageError(f"{args.folder} exists and is not an empty folder; pass a new folder, or --overwrite")
        return args

    return run_command(parse, lambda args: BUILDERS[args.family](args.folder), "written", argv)


if __name__ == "__main__":
    sys.exit(main())
