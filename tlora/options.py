"""train.py's command line: the authors' flags and defaults, `--config FILE.yaml`, and checks of bad input.

Every check here runs before any model is loaded and fails with one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from .adapters import SIG_TYPES, TRAINER_TYPES
from .data import list_images

TRAINER_CLASSES = ("sdxl_lora", "sdxl_tlora")
REQUIRED = ("trainer_type", "trainer_class", "train_data_dir", "output_dir", "class_name", "placeholder_token")
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"


class UsageError(ValueError):
    """Bad input from the command line or a config file; the message is shown as is."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a T-LoRA (or a plain LoRA / Ortho-LoRA) on SDXL.")
    a = p.add_argument
    a("--config", type=str, default=None, help="YAML file of flag values; flags on the command line override it.")
    a("--trainer_type", type=str, default=None, help="lora (Vanilla T-LoRA) or ortho_lora (T-LoRA). Required.")
    a("--trainer_class", type=str, default=None, help="sdxl_tlora (timestep mask) or sdxl_lora (no mask). Required.")
    a("--project_name", type=str, default="tlora", help="W&B project.")
    a("--wandb_api_key", type=str, default=None, help="W&B key (or set WANDB_API_KEY). Never written to disk.")
    a("--report_to", type=str, default=None, choices=["wandb", "tensorboard", "none"],
      help="Tracker. Default: wandb when a W&B key is given, else none.")
    a("--seed", type=int, default=0)
    a("--pretrained_model_name_or_path", type=str, default="stabilityai/stable-diffusion-xl-base-1.0")
    a("--pretrained_vae_model_name_or_path", type=str, default=DEFAULT_VAE,
      help="VAE to use; 'none' = the base model's own VAE.")
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    a("--revision", type=str, default=None)
    a("--num_train_epochs", type=int, default=1000, help="Number of optimizer steps (named as the authors name it).")
    a("--checkpointing_steps", type=int, default=200)
    a("--train_data_dir", type=str, default=None, help="Folder of training images. Required.")
    a("--train_batch_size", type=int, default=1)
    a("--dataloader_num_workers", type=int, default=1)
    a("--resolution", type=int, default=1024)
    a("--output_dir", type=str, default=None, help="Folder that receives one run folder per run. Required.")
    a("--class_data_dir", type=str, default=None, help="Folder of class images for prior preservation.")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--with_prior_preservation", action="store_true", default=False)
    a("--class_name", type=str, default=None, help="Class word, e.g. dog. Required.")
    a("--placeholder_token", type=str, default=None, help="Concept token, e.g. sks. Required.")
    a("--validation_prompts", type=str, default=None, help="'#'-separated prompts; {0} = '<token> <class>'.")
    a("--num_val_imgs_per_prompt", type=int, default=5)
    a("--lora_rank", type=int, default=4)
    a("--min_rank", type=int, default=1)
    a("--sig_type", type=str, default="last", choices=list(SIG_TYPES))
    a("--alpha_rank_scale", type=float, default=1.0)
    a("--learning_rate", type=float, default=1e-4)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--one_image", type=str, default=None, help="Train on this one file of --train_data_dir only.")
    a("--gradient_checkpointing", action="store_true", default=False,
      help="Recompute UNet activations in the backward pass: far less GPU memory, about 30%% slower.")
    a("--use_8bit_adam", action="store_true", default=False, help="bitsandbytes' 8-bit AdamW (CUDA only).")
    a("--allow_tf32", action="store_true", default=False, help="Allow TF32 matmuls on Ampere and newer GPUs.")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not Path(path).is_file():
        raise UsageError(f"--config: file {path} does not exist; pass a YAML file of flag values")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config: unknown key {unknown[0]!r} in {path}; use the flag names of train.py --help")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (over --config values), then check them. Raises UsageError on bad input."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_config_defaults(parser, first.config))
    args = parser.parse_args(argv)
    args.argv = [sys.executable] + list(sys.argv if argv is None else [sys.argv[0], *argv])
    validate(args)
    return args


def _check_image_folder(flag: str, folder: str | None) -> None:
    if not folder or not Path(folder).is_dir():
        raise UsageError(f"{flag}: folder {folder} does not exist; pass a folder that holds the images")
    if not list_images(folder):
        raise UsageError(f"{flag}: no images (.jpg, .jpeg, .png, .webp, .bmp) in {folder}; add at least one")


def validate(args: argparse.Namespace) -> None:
    """Every check that can fail before a model is loaded."""
    for name in REQUIRED:
        if getattr(args, name) in (None, ""):
            raise UsageError(f"--{name} is required (on the command line or in --config)")
    choices = {"trainer_type": TRAINER_TYPES, "trainer_class": TRAINER_CLASSES, "sig_type": SIG_TYPES}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    if args.lora_rank < 1 or args.min_rank < 1:
        raise UsageError(f"--lora_rank and --min_rank must be positive, got {args.lora_rank} and {args.min_rank}")
    if args.min_rank > args.lora_rank:
        raise UsageError(f"--min_rank ({args.min_rank}) must not exceed --lora_rank ({args.lora_rank})")
    for name in ("num_train_epochs", "checkpointing_steps", "train_batch_size", "num_val_imgs_per_prompt"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.resolution < 8 or args.resolution % 8:
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.dataloader_num_workers < 0:
        raise UsageError("--dataloader_num_workers must be 0 or more")
    _check_image_folder("--train_data_dir", args.train_data_dir)
    if args.one_image and not (Path(args.train_data_dir) / args.one_image).is_file():
        raise UsageError(f"--one_image: {args.one_image} is not a file in {args.train_data_dir}; pass a file name there")
    if args.with_prior_preservation:
        _check_image_folder("--class_data_dir", args.class_data_dir)
    if args.use_8bit_adam:
        _check_8bit_adam()
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UsageError(f"--output_dir: {args.output_dir} is a file; pass a folder")


def _check_8bit_adam() -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install -e '.[bnb]' (or drop the flag)")
    if not torch.cuda.is_available():
        raise UsageError("--use_8bit_adam needs a CUDA GPU; drop the flag to train with torch's AdamW")


def wandb_key(args: argparse.Namespace) -> str | None:
    """The W&B key from --wandb_api_key or WANDB_API_KEY (never stored)."""
    return args.wandb_api_key or os.environ.get("WANDB_API_KEY") or None


def tracker(args: argparse.Namespace) -> str | None:
    """Which tracker to use: --report_to, else wandb when a key exists."""
    choice = args.report_to or ("wandb" if wandb_key(args) else "none")
    return None if choice == "none" else choice
