"""inference.py: generate images from a trained run with the authors' command line and folder layout."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from tqdm.auto import tqdm

from tlora import families
from tlora.common.errors import RunFailed, UsageError
from tlora.common.files import check_writable, write_failure
from tlora.common.flags import Parser
from tlora.common.hub import check_model_source
from tlora.common.messages import PASS_HPARAMS, note
from tlora.common.prompts import MAX_WORD_LENGTH, PROMPTS_HELP, check_templates, check_text, split_prompts
from tlora.common.values import check_count, check_device, check_guidance, check_seed, shown
from tlora.families.model_checks import check_vae, long_prompts
from tlora.families.pipelines import DTYPES, load_pipeline
from tlora.generate import generation
from tlora.generate.api import COMPILE_HELP, load
from tlora.generate.generation import distilled_defaults, image_size
from tlora.generate.video import frames_kwargs
from tlora.runs.reading import read
from tlora.runs.run_folder import RunFolder, read_hparams
from tlora.runs.weights import WEIGHTS_NAMES


def by_family(attribute: str) -> str:
    """`Default: <value> (<FAMILY>), ...` for a family attribute, from the families themselves."""
    values = {fam.name.upper(): getattr(fam, attribute) or "the model's own" for fam in families.FAMILIES.values()}
    return "Default: " + ", ".join(f"{value} ({name})" for name, value in values.items()) + "."


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Generate images with a trained T-LoRA.")
    a = p.add_argument
    a("--config_path", type=str, required=True, help="The run's logs/hparams.yml.")
    a("--checkpoint_idx", type=str, default=None, help="N of checkpoint-N; absent = the run folder holds the weights.")
    a("--prompts", type=str, required=True, help=PROMPTS_HELP)
    a("--num_images_per_prompt", type=int, default=5)
    a("--batch_size", type=int, default=1)
    a("--num_inference_steps", type=int, default=None, help=by_family("inference_steps"))
    a("--guidance_scale", type=float, default=None, help=by_family("inference_guidance"))
    for side in ("height", "width"):
        a(f"--{side}", type=int, default=None, help=f"Image {side} in pixels, a multiple of 8 (SDXL) or 16 (FLUX, "
          "klein). Default: the pipeline's own (1024 on the published models, whatever size the run was trained at), "
          "as the authors' tools sample.")
    a("--num_frames", type=int, default=None, help="Video models (Wan): frames per video, 4k + 1 (1: one image). "
      "Default: the pipeline's own (81 on Wan).")
    a("--version", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--replace_inference_output", action="store_true", default=False)
    a("--pretrained_vae_model_name_or_path", type=str, default=None,
      help="Override the run's VAE ('none' = the base model's own). Default: the run's, else the family's: "
           + by_family("default_vae")[len("Default: "):])
    a("--device", type=str, default=None, help="Default: cuda when available, else cpu.")
    a("--dtype", type=str, default=None, choices=["fp32", "fp16", "bf16"],
      help="Default on CUDA: " + by_family("gpu_dtype")[len("Default: "):-1] + "; fp32 on the CPU.")
    a("--compile", action="store_true", default=False, help=COMPILE_HELP + ": the first images wait for it to "
      "compile (minutes on a full-size model), the rest come faster; a new timestep never recompiles.")
    return p


def run_of_config(config_path: Path, hparams: dict) -> tuple[RunFolder, bool]:
    """(the run, whether it was found by its recorded output_dir): for `<run>/logs/hparams.yml` the run is `<run>` and
    nothing else is looked at (a moved or copied run is read, and written to, where it is); only a loose hparams.yml
    (not in a logs/ folder) names its run by the output_dir it records, as the authors' tool reads it."""
    config = Path(os.path.abspath(config_path))
    run = RunFolder(config.parent.parent)
    if config.parent.name == "logs" and (RunFolder.at(run.path) or run.checkpoints()):  # a run's logs/ folder
        return run, False
    recorded = hparams.get("output_dir")
    if not recorded or not Path(recorded).is_dir():
        what = f"the output_dir it records, {recorded}, is not a folder" if recorded else "it records no output_dir"
        raise UsageError(f"--config_path: {config_path} is not in a run's logs/ folder and {what}; pass "
                         "RUN/logs/hparams.yml")
    note(f"{config_path} is not in a run's logs/ folder: reading the run its output_dir records, {recorded}, and "
         "writing samples there")
    return RunFolder(Path(recorded)), True


PASS_STEP = "pass the N of one of the run's checkpoint-N folders"


def checkpoint_folder(run: RunFolder, checkpoint_idx: str | None) -> Path:
    """checkpoint-N of the run (or the run folder itself), which must hold weights (that they are a regular file is
    read's check): one line naming the path otherwise, never another folder's weights."""
    if checkpoint_idx is not None and not re.fullmatch(r"[0-9]+", checkpoint_idx):  # ASCII digits: checkpoint-int(N)
        raise UsageError(f"--checkpoint_idx must be a step number (N of checkpoint-N), got {shown(checkpoint_idx)}; "
                         f"{PASS_STEP}")
    folder = run.checkpoint(checkpoint_idx) if checkpoint_idx is not None else run.path
    if not any(os.path.lexists(folder / name) for name in WEIGHTS_NAMES):
        flag = "--checkpoint_idx is not given and" if checkpoint_idx is None else f"--checkpoint_idx {checkpoint_idx}:"
        what = f"{flag} no T-LoRA weights ({' or '.join(WEIGHTS_NAMES)}) are in {folder}"
        have = ", ".join(str(step) for step, _ in run.checkpoints())
        raise UsageError(f"{what}; {PASS_STEP} ({have or 'it has none'})")
    return folder


TEXT_KEYS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "placeholder_token",
             "class_name", "output_dir")
COUNT_KEYS = ("max_sequence_length",)  # FLUX sampling reads it


HPARAMS_FIX = "fix it, or pass the run's own logs/hparams.yml"


def check_hparams(hparams: dict, path: Path) -> None:
    """The keys inference reads from a hparams.yml have the right type (text; whole numbers >= 1), or are absent."""
    for key in TEXT_KEYS:
        value = hparams.get(key)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"--config_path: {key} in {path} must be text, got {shown(value)}; {HPARAMS_FIX}")
    for key in COUNT_KEYS:
        if hparams.get(key) is not None:
            check_count(f"--config_path: {key} in {path}", hparams[key], HPARAMS_FIX)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything (run, checkpoint and its tensors, prompts, numbers, device, the folder written)
    before any model loads."""
    args = build_parser().parse_args(argv)
    config_path = Path(args.config_path)
    if not _is_file(config_path):
        raise UsageError(f"--config_path: {shown(str(config_path))} does not exist (or is not a file); pass a run's "
                         "logs/hparams.yml")
    hparams = read_hparams(config_path)
    check_hparams(hparams, config_path)
    run, loose = run_of_config(config_path, hparams)
    args.checkpoint = checkpoint_folder(run, args.checkpoint_idx)
    args.ckpt = read(args.checkpoint, config_path, fix=f"add {{key}} to {config_path}")  # that folder's weights only
    args.ckpt.tensors()  # read and checked (finite) now; kept for loading
    family = args.family = args.ckpt.family
    # The authors' hparams.yml have no VAE key: their SDXL tool always uses SDXL's default VAE, FLUX the model's own.
    args.hparams = {"revision": None, "pretrained_vae_model_name_or_path": family.default_vae or "none", **hparams}
    if args.pretrained_vae_model_name_or_path is not None:
        args.hparams["pretrained_vae_model_name_or_path"] = args.pretrained_vae_model_name_or_path
    for key in ("pretrained_model_name_or_path", "placeholder_token", "class_name"):
        if args.hparams.get(key) is None:
            raise UsageError(f"--config_path: {config_path} has no {key}; {PASS_HPARAMS}")
    given = (args.num_inference_steps is not None, args.guidance_scale is not None)
    args.num_inference_steps = family.inference_steps if args.num_inference_steps is None else args.num_inference_steps
    args.guidance_scale = family.inference_guidance if args.guidance_scale is None else args.guidance_scale
    for key in ("placeholder_token", "class_name"):
        check_text(f"--config_path: {key}", args.hparams[key], MAX_WORD_LENGTH)
    args.templates = split_prompts(args.prompts)
    if not args.templates:
        raise UsageError("--prompts: give at least one prompt ('#' separates prompts)")
    check_templates("--prompts", args.templates)
    for name in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
        check_count(f"--{name}", getattr(args, name))
    if args.version < 0:
        raise UsageError(f"--version must be 0 or more, got {args.version}; pass 0 for the first version folder")
    check_guidance("--guidance_scale", args.guidance_scale)
    args.size = image_size(("--height", "--width"), args.height, args.width, family.resolution_multiple)
    args.size |= frames_kwargs("--num_frames", args.num_frames, family)  # a call argument beside the size
    check_seed("--seed", args.seed)
    args.device = check_device(args.device)
    args.dtype = args.dtype or (family.gpu_dtype if args.device.startswith("cuda") else "fp32")
    hp = args.hparams
    check_model_source("--config_path: pretrained_model_name_or_path", hp["pretrained_model_name_or_path"],
                       revision=hp["revision"])
    vae = hp["pretrained_vae_model_name_or_path"]
    if vae and vae.lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", vae, "config.json")
        check_vae("--pretrained_vae_model_name_or_path", vae, hp["pretrained_model_name_or_path"], hp["revision"])
    args.samples = family.samples_folder(args.checkpoint, args.num_inference_steps, args.guidance_scale, args.version)
    check_writable(args.samples, "--config_path", f"the samples of {args.checkpoint} go to {args.samples}: make it "
                   "writable, or copy the run to a folder you can write to")
    if not loose and (old := run.moved_from(hparams)):  # said once the input is known to be good
        note(f"{run.name} was written in {old}; reading it, and writing samples, where it is: {run.path}")
    concept = f"{hp['placeholder_token']} {hp['class_name']}"
    for line in long_prompts(hp["pretrained_model_name_or_path"], hp["revision"], family,
                             [t.format(concept) for t in args.templates],
                             family.call_kwargs(hp).get("max_sequence_length")):
        note(f"--prompts: {line}")
    if said := distilled_defaults(family, hp["pretrained_model_name_or_path"], hp["revision"], *given):
        note(f"{said[0]}: for it, pass {said[1]}")
    return args


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the system, a loop of links
        return False


def run(args: argparse.Namespace) -> Path:
    """Load the base model and the T-LoRA, generate every prompt not already done; returns the version folder."""
    hp = args.hparams
    family = args.family
    pipe = load_pipeline(
        hp["pretrained_model_name_or_path"], hp["pretrained_vae_model_name_or_path"], hp["revision"],
        DTYPES[args.dtype], family,
    ).to(args.device)
    load(pipe, args.ckpt, compile=args.compile)
    cfg = generation.Sampling(
        hp["placeholder_token"], hp["class_name"],
        args.samples,
        args.num_images_per_prompt, args.batch_size, args.num_inference_steps, args.guidance_scale, args.seed,
        args.replace_inference_output, family.call_kwargs(hp) | args.size, family.guidance_arg,
    )
    with tqdm(total=len(set(args.templates)) * args.num_images_per_prompt, desc="images") as bar:
        try:
            generation.run(pipe, args.templates, cfg, str(args.checkpoint), progress=bar)
        except OSError as err:  # a full disk, a folder made read-only meanwhile
            raise RunFailed(f"inference stopped: {write_failure(err, cfg.folder)}; free some space and run the same "
                            "command again (the prompts finished are kept)") from None
    return cfg.folder
