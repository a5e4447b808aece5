"""Experiment tracking through accelerate: W&B (online or WANDB_MODE=offline) or TensorBoard.

The W&B key reaches wandb only through the process environment; configs get `public_hparams`, which has
no key, and sys.argv is redacted before any tracker starts (W&B records the command line).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from tlora.common.redaction import redact_argv

SIMPLE = (int, float, str, bool)


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, config: dict, logs: Path) -> None:
    """Start the chosen tracker with the run's public options; W&B files go under logs/wandb."""
    if not accelerator.log_with:
        return
    simple = {k: v for k, v in config.items() if isinstance(v, SIMPLE)}
    init_kwargs = {"wandb": {"name": args.exp_name, "dir": str(logs)}}
    if getattr(args, "wandb_run_id", None):  # the same W&B run when the run is resumed
        init_kwargs["wandb"] |= {"id": args.wandb_run_id, "resume": "allow"}
    accelerator.init_trackers(args.project_name, config=simple, init_kwargs=init_kwargs)


def log_images(accelerator: Accelerator, images: dict[str, list[Image.Image]], step: int) -> None:
    """Validation images to every tracker, captioned with their prompt text."""
    if not images:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=t) for t, imgs in images.items() for i in imgs]}, step=step)
        elif tracker.name == "tensorboard":
            for text, imgs in images.items():
                tracker.log_images({text: np.stack([np.asarray(i) for i in imgs])}, step, dataformats="NHWC")


def hand_over_secrets(args: argparse.Namespace) -> None:
    """The command's side effects before training: the W&B key goes to wandb through the process environment
    only (never to a file), and sys.argv, which W&B records, loses the key's value."""
    key = args.wandb_api_key or os.environ.get("WANDB_API_KEY")
    if key:
        os.environ["WANDB_API_KEY"] = key
    sys.argv[:] = redact_argv(sys.argv)


def wandb_key(args: argparse.Namespace) -> str | None:
    """The W&B key from --wandb_api_key or WANDB_API_KEY (never stored)."""
    return args.wandb_api_key or os.environ.get("WANDB_API_KEY") or None


def tracker(args: argparse.Namespace) -> str | None:
    """Which tracker to use: --report_to, else wandb when a key exists."""
    choice = args.report_to or ("wandb" if wandb_key(args) else "none")
    return None if choice == "none" else choice
