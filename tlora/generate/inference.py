"""inference.py: generate images from a trained run with the authors' command line and folder layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tlora import families
from tlora.common.errors import UsageError
from tlora.common.prompts import MAX_WORD_LENGTH, check_templates, check_text, split_prompts
from tlora.common.usage import Parser, check_finite, check_model_source
from tlora.families.pipelines import DTYPES, load_pipeline
from tlora.generate import generation
from tlora.generate.api import load
from tlora.runs.reading import read, weights_file
from tlora.runs.run_folder import moved_from, read_hparams


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
      help="Override the run's VAE ('none' = the base model's own). Default: the run's, else the family's "
           f"(SDXL: {families.SDXL.default_vae}, as the authors' SDXL tool; FLUX: the model's own).")
    a("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    a("--dtype", type=str, default=None, choices=["fp32", "fp16", "bf16"],
      help="Default on CUDA: fp16 (SDXL), bf16 (FLUX); fp32 on the CPU.")
    return p


def checkpoint_folder(config_path: Path, hparams: dict, checkpoint_idx: str | None) -> Path:
    """checkpoint-N of the run (or the run folder itself): the run is the folder holding the given
    logs/hparams.yml (so a moved or copied run is read where it is), else the output_dir it records."""
    if checkpoint_idx is not None and not checkpoint_idx.isdigit():
        raise UsageError(f"--checkpoint_idx must be a step number (N of checkpoint-N), got {checkpoint_idx!r}")
    name = f"checkpoint-{checkpoint_idx}" if checkpoint_idx is not None else ""
    candidates = [config_path.resolve().parent.parent]
    if hparams.get("output_dir"):
        candidates.append(Path(str(hparams["output_dir"])))
    for run in candidates:
        folder = run / name if name else run
        if weights_file(folder) is not None:
            return folder
    raise UsageError(f"--checkpoint_idx: no T-LoRA weights (pytorch_lora_weights.safetensors or the authors' lora.pt) "
                     f"in {candidates[0] / name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything (run, checkpoint, prompts, numbers, device) before any model loads."""
    args = build_parser().parse_args(argv)
    config_path = Path(args.config_path)
    if not config_path.is_file():
        raise UsageError(f"--config_path: {config_path} does not exist; pass a run's logs/hparams.yml")
    hparams = read_hparams(config_path)
    args.checkpoint = checkpoint_folder(config_path, hparams, args.checkpoint_idx)
    run = config_path.resolve().parent.parent
    if args.checkpoint.resolve().is_relative_to(run) and (old := moved_from(run, hparams)):
        print(f"note: {run.name} was written in {old}; reading it, and writing samples, where it is: {run}",
              file=sys.stderr)
    args.ckpt = read(args.checkpoint, config_path, fix=f"add {{key}} to {config_path}")  # header only: checked early
    family = families.get(args.ckpt.settings.family)
    args.family = family.name
    # The authors' hparams.yml have no VAE key: their SDXL tool always uses SDXL's default VAE, FLUX the model's own.
    args.hparams = {"revision": None, "pretrained_vae_model_name_or_path": family.default_vae or "none", **hparams}
    if args.pretrained_vae_model_name_or_path is not None:
        args.hparams["pretrained_vae_model_name_or_path"] = args.pretrained_vae_model_name_or_path
    for key in ("pretrained_model_name_or_path", "placeholder_token", "class_name"):
        if args.hparams.get(key) is None:
            raise UsageError(f"--config_path: {config_path} has no {key}; pass a run's logs/hparams.yml")
    args.num_inference_steps = family.inference_steps if args.num_inference_steps is None else args.num_inference_steps
    args.guidance_scale = family.inference_guidance if args.guidance_scale is None else args.guidance_scale
    for key in ("placeholder_token", "class_name"):
        check_text(f"--config_path: {key}", str(args.hparams[key]), MAX_WORD_LENGTH)
    args.templates = split_prompts(args.prompts)
    if not args.templates:
        raise UsageError("--prompts: give at least one prompt ('#' separates prompts)")
    check_templates("--prompts", args.templates)
    for name in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.version < 0:
        raise UsageError(f"--version must be 0 or more, got {args.version}")
    check_finite("--guidance_scale", args.guidance_scale)
    args.device = _device(args.device)
    args.dtype = args.dtype or (family.gpu_dtype if args.device.startswith("cuda") else "fp32")
    hp = args.hparams
    check_model_source("--config_path: pretrained_model_name_or_path", str(hp["pretrained_model_name_or_path"]),
                       revision=hp["revision"])
    vae = hp["pretrained_vae_model_name_or_path"]
    if vae and str(vae).lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", str(vae), "config.json")
    return args


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
    load(pipe, args.ckpt)
    cfg = generation.Sampling(
        hp["placeholder_token"], hp["class_name"],
        family.samples_folder(args.checkpoint, args.num_inference_steps, args.guidance_scale, args.version),
        args.num_images_per_prompt, args.batch_size, args.num_inference_steps, args.guidance_scale, args.seed,
        args.replace_inference_output, family.call_kwargs(hp),
    )
    with tqdm(total=len(args.templates) * args.num_images_per_prompt, desc="images") as bar:
        generation.run(pipe, args.templates, cfg, str(args.checkpoint), progress=bar)
    return cfg.folder
