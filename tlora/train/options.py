"""train.py's command line: the authors' flags and defaults, `--config FILE.yaml`, and checks of bad input.

One command line for both families. The family comes from the model folder (model_index.json); flags
whose default differs between the authors' SDXL and FLUX code default to None here and get their
family's default (families/*.py `train_defaults`) once the model is known. The authors' FLUX flag names
are aliases of ours where the meaning is the same (`--rank` = `--lora_rank`, ...).
Every check here runs before any model is loaded and fails with one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from tlora import families
from tlora.common.errors import UsageError
from tlora.common.images import check_image, find_mask, list_images, training_images
from tlora.common.prompts import MAX_WORD_LENGTH, check_templates, check_text, split_prompts
from tlora.common.usage import Parser, check_finite, check_model_source, load_yaml, redact_argv
from tlora.families.pipelines import BASE_PRECISIONS
from tlora.method.adapters import SIG_TYPES, TRAINER_TYPES
from tlora.method.settings import TRAINER_CLASSES, TLoRASettings

REQUIRED = ("trainer_type", "trainer_class", "train_data_dir", "output_dir", "class_name", "placeholder_token")
DEFAULT_VAE = families.SDXL.default_vae
FLUX_ONLY = {"guidance_scale": 1.0, "max_sequence_length": 512}  # FLUX-only flags and their defaults
LEARNING_RATES = {"adamw": 1e-4, "prodigy": 1.0}  # --learning_rate's default for each --optimizer


def _family_default(flag: str) -> str:
    sdxl, flux = families.SDXL.train_defaults[flag], families.FLUX.train_defaults[flag]
    return f"Default: {sdxl} (SDXL), {flux} (FLUX)." if sdxl != flux else f"Default: {sdxl}."


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train a T-LoRA (or a plain LoRA / Ortho-LoRA) on SDXL or FLUX.1.")
    a = p.add_argument
    a("--config", type=str, default=None, help="YAML file of flag values; flags on the command line override it.")
    a("--trainer_type", type=str, default=None,
      help="lora (Vanilla T-LoRA) or ortho_lora (T-LoRA). Required on SDXL; FLUX default: lora.")
    a("--trainer_class", type=str, default=None,
      help="sdxl_tlora / flux_tlora (timestep mask) or sdxl_lora / flux_lora (no mask). Required on SDXL; "
           "FLUX default: flux_lora (flux_tlora with --tlora).")
    a("--tlora", action="store_true", default=False, help="The authors' FLUX flag: the timestep mask (= --trainer_class "
      "<family>_tlora).")
    a("--project_name", type=str, default="tlora", help="W&B project.")
    a("--wandb_api_key", type=str, default=None, help="W&B key (or set WANDB_API_KEY). Never written to disk.")
    a("--report_to", type=str, default=None, choices=["wandb", "tensorboard", "none"],
      help="Tracker. Default: wandb when a W&B key is given, else none.")
    a("--seed", type=int, default=0)
    a("--pretrained_model_name_or_path", type=str, default="stabilityai/stable-diffusion-xl-base-1.0",
      help="SDXL or FLUX.1 model (folder or hub id); its model_index.json says which family it is.")
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help=f"VAE to use; 'none' = the base model's own. Default: {DEFAULT_VAE} (SDXL), the model's own (FLUX).")
    a("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help=_family_default("mixed_precision"))
    a("--base_model_precision", type=str, default="auto", choices=list(BASE_PRECISIONS),
      help="auto: the frozen UNet/transformer in --mixed_precision's dtype. int8-bnb / nf4-bnb (bitsandbytes, CUDA) "
           "or int8-torchao / fp8-torchao (torchao): a quantized frozen base, for smaller GPUs.")
    a("--revision", type=str, default=None)
    a("--num_train_epochs", "--max_train_steps", dest="num_train_epochs", type=int, default=1000,
      help="Number of optimizer steps (--num_train_epochs as the authors' SDXL code names it).")
    a("--checkpointing_steps", type=int, default=None, help=_family_default("checkpointing_steps"))
    a("--train_data_dir", "--instance_data_dir", dest="train_data_dir", type=str, default=None,
      help="Folder of training images. Required.")
    a("--mask_dir", type=str, default=None,
      help="Folder of loss masks named as the training images (white = counts); the loss is taken on masked "
           "prediction and target. 'None' or '' = no mask.")
    a("--alpha_mask", action="store_true", default=False,
      help="Use each training image's transparency as its loss mask (kohya's --alpha_mask). Without it, transparent "
           "pixels are composited onto white.")
    a("--train_batch_size", type=int, default=1)
    a("--dataloader_num_workers", type=int, default=1)
    a("--resolution", type=int, default=1024)
    a("--output_dir", type=str, default=None, help="Folder that receives one run folder per run. Required.")
    a("--class_data_dir", type=str, default=None, help="Folder of class images for prior preservation.")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--with_prior_preservation", action="store_true", default=False)
    a("--class_name", type=str, default=None, help="Class word, e.g. dog. Required.")
    a("--placeholder_token", type=str, default=None,
      help="Concept token, e.g. sks. Required on SDXL; FLUX default: sks (the authors' FLUX prompt).")
    a("--validation_prompts", "--validation_prompt", dest="validation_prompts", type=str, default=None,
      help="'#'-separated prompts; {0} = '<token> <class>'.")
    a("--num_val_imgs_per_prompt", "--num_validation_images", dest="num_val_imgs_per_prompt", type=int, default=None,
      help=_family_default("num_val_imgs_per_prompt"))
    a("--lora_rank", "--rank", dest="lora_rank", type=int, default=None, help=_family_default("lora_rank"))
    a("--min_rank", type=int, default=None, help=_family_default("min_rank"))
    a("--sig_type", type=str, default="last", choices=list(SIG_TYPES))
    a("--alpha_rank_scale", type=float, default=1.0)
    a("--optimizer", type=str.lower, default=None, choices=["adamw", "prodigy"], help=_family_default("optimizer"))
    a("--learning_rate", type=float, default=None,
      help="Constant learning rate. Default: 1e-4 with --optimizer adamw, 1.0 with --optimizer prodigy (Prodigy's "
           "own step size).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=None,
      help="Clip the adapters' gradient norm (0 = no clipping). Default: none (SDXL), 1.0 (FLUX).")
    a("--guidance_scale", type=float, default=None,
      help="FLUX: the guidance embedding's value during training (FLUX.1-dev is guidance-distilled). Default: 1.0.")
    a("--max_sequence_length", type=int, default=None, help="FLUX: T5 prompt length in tokens. Default: 512.")
    a("--one_image", type=str, default=None, help="Train on this one file of --train_data_dir only.")
    a("--gradient_checkpointing", action="store_true", default=False,
      help="Recompute activations in the backward pass: far less GPU memory, about 30%% slower.")
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
    values = load_yaml(Path(path).read_text(), f"--config: {path}") or {}
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values")
    actions = {s.lstrip("-"): action for action in parser._actions for s in action.option_strings}
    out = {}
    for key, value in values.items():
        if key not in actions or key in ("config", "help", "h"):
            raise UsageError(f"--config: unknown key {key!r} in {path}; use the flag names of train.py --help")
        _check_config_value(actions[key], value, path)
        out[actions[key].dest] = value  # an alias (e.g. rank) sets its flag (lora_rank)
    return out


def _check_config_value(action: argparse.Action, value, path: str) -> None:
    flag = f"--config {path}: --{action.dest}"
    if value is None:
        return
    kind = bool if action.nargs == 0 else action.type or str  # nargs 0: a store_true flag
    kind = str if kind is str.lower else kind
    allowed = (int, float) if kind is float else kind  # YAML writes 1e-4 as a float and 1 as an int
    if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
        raise UsageError(f"{flag} must be {'true/false' if kind is bool else kind.__name__}, got {value!r}")
    value = value.lower() if action.type is str.lower and isinstance(value, str) else value
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
    if folder and Path(folder).is_file():
        raise UsageError(f"{flag}: {folder} is a file, not a folder; pass the folder that holds the images")
    if not folder or not Path(folder).is_dir():
        raise UsageError(f"{flag}: folder {folder} does not exist; pass a folder that holds the images")
    if not list_images(folder):
        raise UsageError(f"{flag}: no images (.jpg, .jpeg, .png, .webp, .bmp) in {folder}; add at least one")


def _check_numbers(args: argparse.Namespace) -> None:
    check_finite("--learning_rate", args.learning_rate, 0, low_open=True)
    check_finite("--alpha_rank_scale", args.alpha_rank_scale, 0, low_open=True)
    check_finite("--prior_loss_weight", args.prior_loss_weight, 0)
    check_finite("--adam_beta1", args.adam_beta1, 0, 1, high_open=True)
    check_finite("--adam_beta2", args.adam_beta2, 0, 1, high_open=True)
    check_finite("--adam_weight_decay", args.adam_weight_decay, 0)
    check_finite("--adam_epsilon", args.adam_epsilon, 0, low_open=True)
    if args.max_grad_norm is not None:
        check_finite("--max_grad_norm", args.max_grad_norm, 0)
    if args.guidance_scale is not None:
        check_finite("--guidance_scale", args.guidance_scale, 0)
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
        raise UsageError(f"--max_sequence_length must be between 1 and 512 (T5's limit), got {args.max_sequence_length}")
    TLoRASettings.from_hparams(vars(args), "train.py", flags=True)
    for name in ("num_train_epochs", "checkpointing_steps", "train_batch_size", "num_val_imgs_per_prompt",
                 "resume_state_total_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    multiple = families.get(args.family).resolution_multiple
    if args.resolution < multiple or args.resolution % multiple:
        raise UsageError(f"--resolution must be a positive multiple of {multiple} for {args.family}, got {args.resolution}")
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
    if args.mask_dir and args.alpha_mask:
        raise UsageError("--alpha_mask and --mask_dir both give loss masks; drop one of them")
    if args.mask_dir:
        images += _check_masks(args)
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


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # W&B refuses these in a project name, and names over 128 characters


def _check_tracker(args: argparse.Namespace) -> None:
    import importlib.util

    if tracker(args) == "wandb":
        bad = sorted(set(args.project_name) & set(WANDB_PROJECT_FORBIDDEN))
        if not args.project_name.strip() or bad or len(args.project_name) > 128:
            raise UsageError(f"--project_name {args.project_name!r}: W&B takes 1 to 128 characters without "
                             f"{' '.join(WANDB_PROJECT_FORBIDDEN)}; pass another name")
    if args.report_to == "tensorboard" and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise UsageError("--report_to tensorboard needs tensorboard: pip install -e '.[tensorboard]' (or --report_to none)")


def apply_family(args: argparse.Namespace) -> None:
    """Detect the model family (from model_index.json) and fill the defaults that depend on it."""
    check_model_source("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, revision=args.revision)
    family = families.get(families.detect(args.pretrained_model_name_or_path, args.revision))
    args.family = family.name
    if args.tlora:
        if args.trainer_class not in (None, f"{family.name}_tlora"):
            raise UsageError(f"--tlora asks for the timestep mask, but --trainer_class is {args.trainer_class}; "
                             "drop one of them")
        args.trainer_class = f"{family.name}_tlora"
    for name, value in family.train_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.learning_rate is None:
        args.learning_rate = LEARNING_RATES[args.optimizer]
    if args.pretrained_vae_model_name_or_path is None:
        args.pretrained_vae_model_name_or_path = family.default_vae or "none"
    for name, default in FLUX_ONLY.items():
        if family.name == "flux" and getattr(args, name) is None:
            setattr(args, name, default)
        elif family.name != "flux" and getattr(args, name) is not None:
            raise UsageError(f"--{name} is for FLUX models; {args.pretrained_model_name_or_path} is {family.name}: "
                             "drop the flag")
    if args.mask_dir in ("None", "none", ""):  # the authors' scripts pass --mask_dir=None for no mask
        args.mask_dir = None


def _check_family_choices(args: argparse.Namespace) -> None:
    if args.trainer_class in TRAINER_CLASSES and not args.trainer_class.startswith(args.family + "_"):
        kind = args.trainer_class.split("_", 1)[1]
        raise UsageError(f"--trainer_class {args.trainer_class} is for another model family; this is a {args.family} "
                         f"model: pass --trainer_class {args.family}_{kind}")
    if args.optimizer == "prodigy":
        _require("--optimizer prodigy", "prodigyopt", "pip install prodigyopt", "or --optimizer adamw")
        if args.use_8bit_adam:
            raise UsageError("--use_8bit_adam is an AdamW option; drop it or pass --optimizer adamw")
    precision = args.base_model_precision
    if precision != "auto":
        package = "bitsandbytes" if precision.endswith("bnb") else "torchao"
        _require(f"--base_model_precision {precision}", package, f"pip install {package}",
                 "or --base_model_precision auto" if package == "torchao" else "pass auto or a torchao precision",
                 cuda=package == "bitsandbytes")


def _require(flag: str, package: str, install: str, instead: str, cuda: bool = False) -> None:
    """`flag` needs `package` installed (and a CUDA GPU when `cuda`): one line naming the fix otherwise."""
    import importlib.util

    import torch

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"{flag} needs {package}: {install} ({instead})")
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"{flag} needs a CUDA GPU; {instead}")


def _check_masks(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every training image has its mask in --mask_dir; returns (flag, mask) pairs for the image checks."""
    if Path(args.mask_dir).is_file():
        raise UsageError(f"--mask_dir: {args.mask_dir} is a file, not a folder; pass the folder of masks")
    if not Path(args.mask_dir).is_dir():
        raise UsageError(f"--mask_dir: folder {args.mask_dir} does not exist; pass the folder of masks (or drop the flag)")
    pairs = []
    for image in training_images(args.train_data_dir, args.one_image):
        mask = find_mask(args.mask_dir, image)
        if mask is None:
            raise UsageError(f"--mask_dir: no mask for {image.name} in {args.mask_dir}; add one with the same name")
        pairs.append(("--mask_dir", mask))
    return pairs


def validate(args: argparse.Namespace) -> None:
    """Every check that can fail before a model is loaded."""
    from tlora.train import resume

    resume.resolve_output_dir(args)
    apply_family(args)
    for name in REQUIRED:
        if getattr(args, name) in (None, ""):
            raise UsageError(f"--{name} is required (on the command line or in --config)")
    choices = {"trainer_type": TRAINER_TYPES, "trainer_class": TRAINER_CLASSES, "sig_type": SIG_TYPES}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}")
    _check_family_choices(args)
    _check_numbers(args)
    check_text("--placeholder_token", args.placeholder_token, MAX_WORD_LENGTH)
    check_text("--class_name", args.class_name, MAX_WORD_LENGTH)
    if args.validation_prompts:
        check_templates("--validation_prompts", split_prompts(args.validation_prompts))
    _check_data(args)
    if args.use_8bit_adam:
        _require("--use_8bit_adam", "bitsandbytes", "pip install -e '.[bnb]'",
                 "drop the flag to train with torch's AdamW", cuda=True)
    _check_tracker(args)
    _check_output_dir(args.output_dir)
    if args.pretrained_vae_model_name_or_path and args.pretrained_vae_model_name_or_path.lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, "config.json")
    resume.check(args)


def wandb_key(args: argparse.Namespace) -> str | None:
    """The W&B key from --wandb_api_key or WANDB_API_KEY (never stored)."""
    return args.wandb_api_key or os.environ.get("WANDB_API_KEY") or None


def tracker(args: argparse.Namespace) -> str | None:
    """Which tracker to use: --report_to, else wandb when a key exists."""
    choice = args.report_to or ("wandb" if wandb_key(args) else "none")
    return None if choice == "none" else choice
