"""train.py's command line: the authors' flags and defaults, `--config FILE.yaml`, and checks of bad input.

Every check here runs before any model is loaded and fails with one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import string
import sys
from pathlib import Path

import yaml

from .adapters import SIG_TYPES, TRAINER_CLASSES, TRAINER_TYPES
from .data import check_image, list_images, training_images
from .generation import split_prompts
from .usage import Parser, UsageError, check_finite, check_model_source, redact_argv

REQUIRED = ("trainer_type", "trainer_class", "train_data_dir", "output_dir", "class_name", "placeholder_token")
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"
MAX_PROMPT_LENGTH = 1000
MAX_WORD_LENGTH = 64


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train a T-LoRA (or a plain LoRA / Ortho-LoRA) on SDXL.")
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
    a("--resume_from_checkpoint", type=str, default=None,
      help="A checkpoint-N folder, a run folder (its newest complete checkpoint) or 'latest' (the newest run in "
           "--output_dir with the same settings; a new run when there is none).")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoint folders.")
    a("--resume_state_total_limit", type=int, default=1,
      help="Keep the resume state (optimizer, RNG, data order) in the newest N checkpoints only.")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The flag values of a --config YAML file, each checked against its flag's type and choices."""
    if not Path(path).is_file():
        raise UsageError(f"--config: file {path} does not exist; pass a YAML file of flag values")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"--config: {path} is not valid YAML{line} ({getattr(err, 'problem', err)}); fix the file")
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    actions = {action.dest: action for action in parser._actions}
    for key, value in values.items():
        if key not in actions or key in ("config", "help"):
            raise UsageError(f"--config: unknown key {key!r} in {path}; use the flag names of train.py --help")
        _check_config_value(actions[key], value, path)
    return values


def _check_config_value(action: argparse.Action, value, path: str) -> None:
    flag = f"--config {path}: --{action.dest}"
    if value is None:
        return
    kind = bool if action.nargs == 0 else action.type or str  # nargs 0: a store_true flag
    allowed = (int, float) if kind is float else kind  # YAML writes 1e-4 as a float and 1 as an int
    if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
        raise UsageError(f"{flag} must be {'true/false' if kind is bool else kind.__name__}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{flag} must be one of {', '.join(map(str, action.choices))}, got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (over --config values), then check them. Raises UsageError on bad input."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_config_defaults(parser, first.config))
    args = parser.parse_args(argv)
    args.argv = redact_argv([sys.executable] + list(sys.argv if argv is None else [sys.argv[0], *argv]))
    validate(args)
    return args


def _check_image_folder(flag: str, folder: str | None) -> None:
    if not folder or not Path(folder).is_dir():
        raise UsageError(f"{flag}: folder {folder} does not exist; pass a folder that holds the images")
    if not list_images(folder):
        raise UsageError(f"{flag}: no images (.jpg, .jpeg, .png, .webp, .bmp) in {folder}; add at least one")


def check_text(flag: str, text: str, limit: int) -> None:
    """A word or prompt: not empty, no control characters, at most `limit` characters."""
    if not text.strip():
        raise UsageError(f"{flag} must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(f"{flag}: {text[:40]!r} holds a control character (a newline?); remove it")
    if len(text) > limit:
        raise UsageError(f"{flag}: {text[:40]!r}... has {len(text)} characters; the limit is {limit}")


def check_templates(flag: str, templates: list[str]) -> None:
    """Prompt templates whose only field is {0} (the concept), each of a sane length."""
    for template in templates:
        check_text(flag, template, MAX_PROMPT_LENGTH)
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        except ValueError as err:
            raise UsageError(f"{flag}: {template!r} has unbalanced braces ({err}); write {{{{ and }}}} for braces")
        for name, spec, conv in fields:
            if name not in ("0", "") or spec or conv:
                raise UsageError(f"{flag}: {template!r} has the field {{{name}}}; only {{0}} (the concept) may stand "
                                 "in braces, write {{ and }} for braces")


def _check_numbers(args: argparse.Namespace) -> None:
    check_finite("--learning_rate", args.learning_rate, 0, low_open=True)
    check_finite("--alpha_rank_scale", args.alpha_rank_scale, 0, low_open=True)
    check_finite("--prior_loss_weight", args.prior_loss_weight, 0)
    check_finite("--adam_beta1", args.adam_beta1, 0, 1, high_open=True)
    check_finite("--adam_beta2", args.adam_beta2, 0, 1, high_open=True)
    check_finite("--adam_weight_decay", args.adam_weight_decay, 0)
    check_finite("--adam_epsilon", args.adam_epsilon, 0, low_open=True)
    if args.lora_rank < 1 or args.min_rank < 1:
        raise UsageError(f"--lora_rank and --min_rank must be positive, got {args.lora_rank} and {args.min_rank}")
    if args.min_rank > args.lora_rank:
        raise UsageError(f"--min_rank ({args.min_rank}) must not exceed --lora_rank ({args.lora_rank})")
    for name in ("num_train_epochs", "checkpointing_steps", "train_batch_size", "num_val_imgs_per_prompt",
                 "resume_state_total_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.resolution < 8 or args.resolution % 8:
        raise UsageError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.dataloader_num_workers < 0:
        raise UsageError("--dataloader_num_workers must be 0 or more")


def _check_data(args: argparse.Namespace) -> None:
    _check_image_folder("--train_data_dir", args.train_data_dir)
    if args.one_image:
        name = args.one_image
        if Path(name).name != name or name in (".", ".."):
            raise UsageError(f"--one_image: {name} must be a file name inside --train_data_dir, not a path")
        if not (Path(args.train_data_dir) / name).is_file():
            raise UsageError(f"--one_image: {name} is not a file in {args.train_data_dir}; pass a file name there")
    digest = hashlib.sha256()
    images = [("--train_data_dir", p) for p in training_images(args.train_data_dir, args.one_image)]
    if args.with_prior_preservation:
        _check_image_folder("--class_data_dir", args.class_data_dir)
        images += [("--class_data_dir", p) for p in list_images(args.class_data_dir)]
    for flag, path in images:
        check_image(path, flag)
        digest.update(f"{flag} {path.name} ".encode() + hashlib.sha256(path.read_bytes()).digest())
    args.data_sha256 = digest.hexdigest()  # recorded in hparams.yml: resume refuses other data


def _check_output_dir(folder: str) -> None:
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir: {folder} is a file; pass a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir: cannot write in {existing}; pass a folder you can write to")


def _check_tracker(args: argparse.Namespace) -> None:
    import importlib.util

    if args.report_to == "tensorboard" and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise UsageError("--report_to tensorboard needs tensorboard: pip install -e '.[tensorboard]' (or --report_to none)")


def validate(args: argparse.Namespace) -> None:
    """Every check that can fail before a model is loaded."""
    from . import resume

    resume.resolve_output_dir(args)
    for name in REQUIRED:
        if getattr(args, name) in (None, ""):
            raise UsageError(f"--{name} is required (on the command line or in --config)")
    choices = {"trainer_type": TRAINER_TYPES, "trainer_class": TRAINER_CLASSES, "sig_type": SIG_TYPES}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    _check_numbers(args)
    check_text("--placeholder_token", args.placeholder_token, MAX_WORD_LENGTH)
    check_text("--class_name", args.class_name, MAX_WORD_LENGTH)
    if args.validation_prompts:
        check_templates("--validation_prompts", split_prompts(args.validation_prompts))
    _check_data(args)
    if args.use_8bit_adam:
        _check_8bit_adam()
    _check_tracker(args)
    _check_output_dir(args.output_dir)
    check_model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, revision=args.revision)
    if args.pretrained_vae_model_name_or_path and args.pretrained_vae_model_name_or_path.lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, "config.json")
    resume.check(args)


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
