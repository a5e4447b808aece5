"""inference.py: generate images from a trained run with the authors' command line and folder layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import families, generation
from .api import checkpoint_family, load, read_hparams, settings, usable
from .checkpoint import check_made_with, read_header
from .models import DTYPES, load_pipeline
from .options import DEFAULT_VAE, MAX_WORD_LENGTH, check_templates, check_text
from .usage import Parser, UsageError, check_finite, check_model_source

# The authors' SDXL hparams.yml has no VAE or family key: their SDXL tool always uses this VAE.
# min_rank and alpha default in tlora.load; a FLUX run uses its model's own VAE.
HPARAM_DEFAULTS = {"revision": None, "pretrained_vae_model_name_or_path": DEFAULT_VAE, "family": "sdxl"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Generate images with a trained T-LoRA.")
    a = p.add_argument
    a("--config_path", type=str, required=True, help="The run's logs/hparams.yml.")
    a("--checkpoint_idx", type=str, default=None, help="N of checkpoint-N; absent = the run folder holds the weights.")
    a("--prompts", type=str, required=True, help="'#'-separated prompts; {0} = '<token> <class>'.")
    a("--num_images_per_prompt", type=int, default=5)
    a("--batch_size", type=int, default=1)
    a("--num_inference_steps", type=int, default=None, help="Default: 25 (SDXL), 28 (FLUX).")
    a("--guidance_scale", type=float, default=None, help="Default: 5.0 (SDXL), 3.5 (FLUX).")
    a("--version", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--replace_inference_output", action="store_true", default=False)
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help="Override the run's VAE ('none' = the base model's own). Default: the run's, else " + DEFAULT_VAE + ".")
    a("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    a("--dtype", type=str, default=None, choices=["fp32", "fp16", "bf16"], help="Default: fp16 on CUDA, fp32 on CPU.")
    return p


def checkpoint_folder(config_path: Path, hparams: dict, checkpoint_idx: str | None) -> Path:
    """checkpoint-N of the run (or the run folder itself); the run is hparams' output_dir, or the
    folder holding logs/hparams.yml when that run folder was moved."""
    if checkpoint_idx is not None and not checkpoint_idx.isdigit():
        raise UsageError(f"--checkpoint_idx must be a step number (N of checkpoint-N), got {checkpoint_idx!r}")
    name = f"checkpoint-{checkpoint_idx}" if checkpoint_idx is not None else ""
    candidates = [Path(str(hparams.get("output_dir", ""))), config_path.resolve().parent.parent]
    for run in candidates:
        folder = run / name if name else run
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            return folder
    raise UsageError(f"--checkpoint_idx: no pytorch_lora_weights.safetensors in {candidates[-1] / name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything (run, checkpoint, prompts, numbers, device) before any model loads."""
    args = build_parser().parse_args(argv)
    config_path = Path(args.config_path)
    if not config_path.is_file():
        raise UsageError(f"--config_path: {config_path} does not exist; pass a run's logs/hparams.yml")
    args.hparams = {**HPARAM_DEFAULTS, **read_hparams(config_path)}
    if args.pretrained_vae_model_name_or_path is not None:
        args.hparams["pretrained_vae_model_name_or_path"] = args.pretrained_vae_model_name_or_path
    for key in ("pretrained_model_name_or_path", "placeholder_token", "class_name", "lora_rank"):
        if key not in args.hparams:
            raise UsageError(f"--config_path: {config_path} has no {key}; pass a run's logs/hparams.yml")
    family = families.get(str(args.hparams["family"]))
    args.family = family.name
    args.num_inference_steps = family.inference_steps if args.num_inference_steps is None else args.num_inference_steps
    args.guidance_scale = family.inference_guidance if args.guidance_scale is None else args.guidance_scale
    for key in ("placeholder_token", "class_name"):
        check_text(f"--config_path: {key}", str(args.hparams[key]), MAX_WORD_LENGTH)
    args.templates = generation.split_prompts(args.prompts)
    if not args.templates:
        raise UsageError("--prompts: give at least one prompt ('#' separates prompts)")
    check_templates("--prompts", args.templates)
    for name in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.version < 0:
        raise UsageError(f"--version must be 0 or more, got {args.version}")
    check_finite("--guidance_scale", args.guidance_scale)
    args.checkpoint = checkpoint_folder(config_path, args.hparams, args.checkpoint_idx)
    _check_checkpoint(args)
    args.device = _device(args.device)
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    hp = args.hparams
    check_model_source("--config_path: pretrained_model_name_or_path", str(hp["pretrained_model_name_or_path"]),
                       revision=hp["revision"])
    vae = hp["pretrained_vae_model_name_or_path"]
    if vae and str(vae).lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", str(vae), "config.json")
    return args


def _check_checkpoint(args: argparse.Namespace) -> None:
    """The weights file is whole and was written with the run's trainer_type and lora_rank (header only)."""
    shapes, metadata = read_header(args.checkpoint)
    family = checkpoint_family(shapes, metadata, args.hparams)
    if family != args.family:
        raise UsageError(f"--checkpoint_idx: {args.checkpoint} was trained on {family}, but the run is {args.family}")
    shapes = usable(shapes, family)
    cfg = settings(shapes, metadata, args.hparams, family)
    check_made_with(shapes, cfg["trainer_type"], cfg["lora_rank"], where=f"--checkpoint_idx: {args.checkpoint}")


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return name


def run(args: argparse.Namespace) -> Path:
    """Load the base model and the T-LoRA, generate every prompt not already done; returns the version folder."""
    hp = args.hparams
    family = families.get(args.family)
    pipe = load_pipeline(
        hp["pretrained_model_name_or_path"], hp["pretrained_vae_model_name_or_path"], hp["revision"], DTYPES[args.dtype],
        family.name,
    ).to(args.device)
    load(pipe, args.checkpoint, hp)
    cfg = generation.Sampling(
        hp["placeholder_token"], hp["class_name"],
        family.samples_folder(args.checkpoint, args.num_inference_steps, args.guidance_scale, args.version),
        args.num_images_per_prompt, args.batch_size, args.num_inference_steps, args.guidance_scale, args.seed,
        args.replace_inference_output, generation.call_kwargs(family.name, hp),
    )
    with tqdm(total=len(args.templates) * args.num_images_per_prompt, desc="images") as bar:
        generation.run(pipe, args.templates, cfg, str(args.checkpoint), progress=bar)
    return cfg.folder
