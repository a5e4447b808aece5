"""The run folder (`<output_dir>/<NNNNN>-<hex>-<data>_<t?><type><rank>/`) and its logs/hparams.yml."""

from __future__ import annotations

import argparse
import os
import re
import secrets
from pathlib import Path

import yaml

from .checkpoint import atomic_write

SECRET_FLAGS = ("--wandb_api_key",)
RUN_INDEX = re.compile(r"^(\d+)-")


def next_run_index(output_dir: Path) -> int:
    """One more than the highest run index in output_dir (1 for an empty folder)."""
    indices = [int(m.group(1)) for p in output_dir.iterdir() if (m := RUN_INDEX.match(p.name))]
    return max(indices, default=0) + 1


def run_name(args: argparse.Namespace, index: int) -> str:
    data = os.path.basename(os.path.normpath(args.train_data_dir))
    t = "t" if args.trainer_class == "sdxl_tlora" else ""
    return f"{index:05d}-{secrets.token_hex(2)}-{data}_{t}{args.trainer_type}{args.lora_rank}"


def create_run_folder(args: argparse.Namespace) -> Path:
    """Make a new, empty run folder; never reuses an existing one."""
    output_dir = Path(args.output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        folder = output_dir / run_name(args, next_run_index(output_dir))
        try:
            folder.mkdir()
        except FileExistsError:  # another run took this name a moment ago
            continue
        (folder / "logs").mkdir()
        return folder
    raise RuntimeError(f"could not create a new run folder in {output_dir}")


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the values of secret flags replaced (both `--flag value` and `--flag=value`)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("<redacted>")
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


def public_hparams(args: argparse.Namespace) -> dict:
    """Every option, with secrets removed: what hparams.yml and the tracker's config receive."""
    values = dict(vars(args))
    values["wandb_api_key"] = None
    values["argv"] = redact_argv(list(values.get("argv", [])))
    return values


def write_hparams(args: argparse.Namespace, folder: Path) -> Path:
    """Record the run: every option plus exp_name, output_dir (= the run folder), logging_dir, argv."""
    args.exp_name = folder.name
    args.output_dir = str(folder)
    args.logging_dir = str(folder / "logs")
    path = folder / "logs" / "hparams.yml"
    atomic_write(path, yaml.safe_dump(public_hparams(args), sort_keys=True).encode())
    return path
