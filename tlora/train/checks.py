"""Checking train.py's options before any model loads: `validate` looks at the values only (a pure function of
the options); `check_inputs` opens what they name (images, masks, folders, packages, model sources). Both fail
with one line naming the flag and the fix."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.common.files import check_folder
from tlora.common.hub import check_model_source
from tlora.common.images import (
    CLIP_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    broken_links,
    check_clip,
    check_image,
    clip_frames,
    find_mask,
    list_clips,
    list_images,
    load_mask,
    training_images,
)
from tlora.common.messages import WRITABLE_FOLDER, note
from tlora.common.prompts import BASE_PROMPT, MAX_WORD_LENGTH, check_templates, check_text, split_prompts
from tlora.common.values import check_count, check_finite, check_guidance, check_seed, out_of_range, shown
from tlora.families.model_checks import MAX_SEQUENCE_LENGTH, check_vae, long_prompts
from tlora.generate.generation import distilled_defaults, image_size
from tlora.generate.video import frames_kwargs
from tlora.runs.hparams import TRAINER_CLASSES, from_hparams
from tlora.train.options import TrainOptions
from tlora.train.tracking import tracker

REQUIRED = ("trainer_type", "trainer_class", "train_data_dir", "output_dir", "class_name", "placeholder_token")
AT_LEAST_ONE = ("num_train_epochs", "checkpointing_steps", "train_batch_size", "num_val_imgs_per_prompt",
                "resume_state_total_limit")
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # W&B refuses these in a project name, and names over 128 characters


# -- the values ------------------------------------------------------------------------------------------
def validate(opts: TrainOptions) -> None:
    """Every check of the values themselves (no file is read)."""
    for name in REQUIRED:
        if getattr(opts, name) in (None, ""):
            raise UsageError(f"--{name} is required; pass it on the command line or in --config")
    _check_family(opts)
    _check_numbers(opts)
    from_hparams(vars(opts), "train.py", flags=True)  # ranks, alpha, trainer type
    check_text("--placeholder_token", opts.placeholder_token, MAX_WORD_LENGTH)
    check_text("--class_name", opts.class_name, MAX_WORD_LENGTH)
    if opts.validation_prompts is not None:
        if not split_prompts(opts.validation_prompts):
            raise UsageError(f"--validation_prompts {shown(opts.validation_prompts)} holds no prompt ('#' separates "
                             "prompts); give at least one, or drop the flag for no validation images")
        check_templates("--validation_prompts", split_prompts(opts.validation_prompts))
    image_size(("--validation_height", "--validation_width"), opts.validation_height, opts.validation_width,
               opts.recipe.resolution_multiple)
    frames_kwargs("--validation_num_frames", opts.validation_num_frames, opts.recipe)
    if opts.mask_dir and opts.alpha_mask:
        raise UsageError("--alpha_mask and --mask_dir both give loss masks; drop one of them")
    if opts.optimizer == "prodigy" and opts.use_8bit_adam:
        raise UsageError("--use_8bit_adam is an AdamW option; drop it or pass --optimizer adamw")
    if tracker(opts) == "wandb":
        bad = set(opts.project_name) & set(WANDB_PROJECT_FORBIDDEN)
        if not opts.project_name.strip() or bad or len(opts.project_name) > 128:
            raise UsageError(f"--project_name {opts.project_name!r}: W&B takes 1 to 128 characters without "
                             f"{' '.join(WANDB_PROJECT_FORBIDDEN)}; pass another name")


def _check_family(opts: TrainOptions) -> None:
    if opts.trainer_class in TRAINER_CLASSES and not opts.trainer_class.startswith(opts.family + "_"):
        kind = opts.trainer_class.rsplit("_", 1)[1]
        raise UsageError(f"--trainer_class {opts.trainer_class} is for another model family; this is a {opts.family} "
                         f"model: pass --trainer_class {opts.family}_{kind}")
    multiple = opts.recipe.resolution_multiple
    if opts.resolution % multiple or opts.resolution < max(MIN_SIDE, multiple):
        native = opts.recipe.train_defaults.get("resolution", 1024)  # the family's own size (Wan 480, SD 1.5 512)
        raise UsageError(f"--resolution must be a multiple of {multiple} for {opts.family}, at least "
                         f"{max(MIN_SIDE, multiple)}, got {opts.resolution}; pass one such as {native}")


def _check_numbers(opts: TrainOptions) -> None:
    check_seed("--seed", opts.seed, processes=int(os.environ.get("WORLD_SIZE", "1")))
    check_finite("--learning_rate", opts.learning_rate, 0, low_open=True)
    check_finite("--alpha_rank_scale", opts.alpha_rank_scale, 0, low_open=True)
    check_finite("--prior_loss_weight", opts.prior_loss_weight, 0)
    check_finite("--adam_beta1", opts.adam_beta1, 0, 1, high_open=True)
    check_finite("--adam_beta2", opts.adam_beta2, 0, 1, high_open=True)
    check_finite("--adam_weight_decay", opts.adam_weight_decay, 0)
    check_finite("--adam_epsilon", opts.adam_epsilon, 0, low_open=True)
    if opts.max_grad_norm is not None:
        check_finite("--max_grad_norm", opts.max_grad_norm, 0)
    if opts.guidance_scale is not None:
        check_guidance("--guidance_scale", opts.guidance_scale)
    if opts.max_sequence_length is not None and not 1 <= opts.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise out_of_range("--max_sequence_length", f"between 1 and {MAX_SEQUENCE_LENGTH} (the FLUX pipelines' limit)",
                           opts.max_sequence_length)
    for name in AT_LEAST_ONE:
        check_count(f"--{name}", getattr(opts, name))
    if opts.checkpoints_total_limit is not None:
        check_count("--checkpoints_total_limit", opts.checkpoints_total_limit)
    if opts.dataloader_num_workers < 0:
        raise UsageError("--dataloader_num_workers must be 0 or more; pass 0 to load data in the training process")


# -- what the values name ------------------------------------------------------------------------------
def check_inputs(opts: TrainOptions) -> None:
    """Open and check everything the options name; records the training data's digest (resume compares it)."""
    opts.data_sha256, frames = _check_data(opts)
    _fit_batch(opts)
    _check_frames(opts, frames)
    if opts.optimizer == "prodigy":
        _require("--optimizer prodigy", "prodigyopt", "pip install prodigyopt (or pass --optimizer adamw)")
    if opts.base_model_precision != "auto":
        package = "bitsandbytes" if opts.base_model_precision.endswith("bnb") else "torchao"
        instead = "pass --base_model_precision auto" + (" or a torchao precision" if package == "bitsandbytes" else "")
        _require(f"--base_model_precision {opts.base_model_precision}", package, f"pip install {package} ({instead})",
                 cuda_fix=instead if package == "bitsandbytes" else None)
    if opts.use_8bit_adam:
        instead = "drop the flag to train with torch's AdamW"
        _require("--use_8bit_adam", "bitsandbytes", f"pip install -e '.[bnb]' (or {instead})", cuda_fix=instead)
    if opts.report_to == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise UsageError("--report_to tensorboard needs tensorboard: pip install -e '.[tensorboard]' (or --report_to none)")
    _check_output_dir(opts.output_dir)
    vae = opts.pretrained_vae_model_name_or_path
    if vae and vae.lower() != "none":
        check_model_source("--pretrained_vae_model_name_or_path", vae, "config.json")
        check_vae("--pretrained_vae_model_name_or_path", vae, opts.pretrained_model_name_or_path, opts.revision)
    _announce_long_prompts(opts)
    if opts.validation_prompts and (said := distilled_defaults(opts.recipe, opts.pretrained_model_name_or_path,
                                                               opts.revision)):
        note(f"--validation_prompts: validation samples at the defaults ({said[0]}): sample that model's "
             f"checkpoints with inference.py {said[1]}")


def _announce_long_prompts(opts: TrainOptions) -> None:
    """A note for each prompt (training's and validation's) that a text encoder of the model will cut."""
    concept = f"{opts.placeholder_token} {opts.class_name}"
    prompts = [BASE_PROMPT.format(concept)] + [t.format(concept) for t in split_prompts(opts.validation_prompts)]
    if opts.with_prior_preservation:
        prompts.append(BASE_PROMPT.format(opts.class_name))
    for line in long_prompts(opts.pretrained_model_name_or_path, opts.revision, opts.recipe, prompts,
                             opts.max_sequence_length):
        note(line)


def _check_data(opts: TrainOptions) -> tuple[str, dict[Path, int]]:
    """Every training image (a video family's: image or clip), mask and class image opens and is large enough;
    returns their SHA-256 and how many frames each training item trains on (a photo: 1)."""
    clips = clip_frames(opts.recipe)
    _check_image_folder("--train_data_dir", opts.train_data_dir,
                        f"{opts.family} trains on photos" if clips is None else None)
    if opts.one_image:
        name = opts.one_image
        if Path(name).name != name or name in (".", ".."):
            raise UsageError(f"--one_image: {name} must be a file name inside --train_data_dir, not a path; pass the "
                             "file name alone")
        if not (Path(opts.train_data_dir) / name).is_file():
            raise UsageError(f"--one_image: {name} is not a file in {opts.train_data_dir}; pass a file name there")
    items = instance_items(opts)
    sizes, frames, counts = {}, {}, {}
    for path in items:  # (first: the clips' frames decide what the masks may be)
        sizes[path], frames[path], counts[path] = _check_item(opts, path, clips)
    if cut := [p for p in items if counts[p] is None or counts[p] > frames[p]]:
        step, most = clips
        said = ", ".join(f"{p.name} {frames[p]} of {counts[p] or f'over {most}'}" for p in cut)
        note(f"--train_data_dir: clips train on their first {step}k + 1 frames, at most {most} (what {opts.family}'s "
             f"VAE encodes): {said} frames; trim a clip to make it so")
    images = [("--train_data_dir", p) for p in items]
    if opts.mask_dir:
        images += _check_masks(opts)
    if opts.with_prior_preservation:
        _check_image_folder("--class_data_dir", opts.class_data_dir, "class images are photos")
        images += [("--class_data_dir", p) for p in list_images(opts.class_data_dir)]
    digest = hashlib.sha256()  # (the clips' bytes as the photos': a run resumes on the data it trained on)
    for flag, path in images:
        if flag != "--train_data_dir":
            sizes[path] = check_image(path, flag)
        digest.update(f"{flag} {path.name} ".encode() + hashlib.sha256(path.read_bytes()).digest())
    _check_mask_content(opts, sizes)
    return digest.hexdigest(), frames


def instance_items(opts: TrainOptions) -> list[Path]:
    """The training items: --train_data_dir's images (a video family's: and clips), or --one_image."""
    return training_images(opts.train_data_dir, opts.one_image, clip_frames(opts.recipe) is not None)


def _check_item(opts: TrainOptions, path: Path, clips: tuple[int, int] | None
                ) -> tuple[tuple[int, int], int, int | None]:
    """A training item's size, the frames it trains on and the frames it has (None: more than train, not counted):
    an image family's photo (1), a video family's clip (its first 4k + 1 frames, refused with a loss mask when more
    than one) or photo (a one-frame clip)."""
    if clips is None:
        return check_image(path, "--train_data_dir"), 1, 1
    size, used, count = check_clip(path, "--train_data_dir", *clips)
    if used > 1 and (opts.mask_dir or opts.alpha_mask):
        flag = "--mask_dir" if opts.mask_dir else "--alpha_mask"
        raise UsageError(f"{flag}: {path.name} is a clip ({used} frames train) and loss masks are for photos; drop "
                         f"{flag}, or remove the clips from {opts.train_data_dir}")
    return size, used, count


def _check_frames(opts: TrainOptions, frames: dict[Path, int]) -> None:
    """A batch is one tensor: with more than one item in it, every training item trains on as many frames."""
    counts = {n: path.name for path, n in sorted(frames.items(), reverse=True)}  # (the first name of each count)
    if len(counts) > 1 and opts.train_batch_size > 1:
        said = ", ".join(f"{name} {n} frame{'s' * (n > 1)}" for n, name in sorted(counts.items()))
        raise UsageError(f"--train_batch_size {opts.train_batch_size}: the training items train on different numbers "
                         f"of frames ({said}) and a batch holds one; pass --train_batch_size 1, or give every clip as "
                         "many frames")


def _check_mask_content(opts: TrainOptions, sizes: dict[Path, tuple[int, int]]) -> None:
    """Each loss mask is its image's size and leaves something of the image, as cropped, to learn."""
    if not (opts.mask_dir or opts.alpha_mask):
        return
    resize_first = opts.recipe.resize_first
    for image in instance_items(opts):
        mask = find_mask(opts.mask_dir, image) if opts.mask_dir else image
        if sizes[mask] != sizes[image]:
            raise UsageError(f"--mask_dir: {mask.name} is {sizes[mask][0]}x{sizes[mask][1]} but its image {image.name} "
                             f"is {sizes[image][0]}x{sizes[image][1]}; give each mask its image's size")
        if load_mask(mask, opts.resolution, resize_first, alpha=opts.alpha_mask).max() == 0:
            what = (f"--alpha_mask: {image.name} is fully transparent" if opts.alpha_mask else
                    f"--mask_dir: {mask.name} is all black")
            raise UsageError(f"{what} where the image is cropped to train, so the loss would ignore all of it; fix the "
                             "mask (white = learn) or remove the image")


def training_items(opts: TrainOptions) -> int:
    """How many items a pass over the data has (DreamBooth pairs instance and class images)."""
    items = len(instance_items(opts))
    if opts.with_prior_preservation:
        items = max(items, len(list_images(opts.class_data_dir)))
    return items


def _fit_batch(opts: TrainOptions) -> None:
    """A batch holds at most one of each training item (DreamBooth's pairs): a larger --train_batch_size is
    recorded as the size used, with a note."""
    items = training_items(opts)
    if opts.train_batch_size > items:
        note(f"--train_batch_size {opts.train_batch_size}: there are {items} training items, so a batch holds {items}; "
             f"training and hparams.yml use {items} (pass --train_batch_size {items} to say so)")
        opts.train_batch_size = items


def _check_image_folder(flag: str, folder: str | None, photos_only: str | None) -> None:
    """The folder holds images (`photos_only` None: images or clips); clip files in a folder of photos only are
    named in a note as skipped, with the reason `photos_only` gives."""
    check_folder(flag, folder, "pass the folder that holds the images")
    for link in broken_links(folder, clips=photos_only is None):
        raise UsageError(f"{flag}: {link.name} in {folder} is a link to nothing ({os.readlink(link)} is gone); remove "
                         "it or restore its target")
    if photos_only and (clips := list_clips(folder)):
        names = ", ".join(p.name for p in clips[:5]) + (f" and {len(clips) - 5} more" if len(clips) > 5 else "")
        note(f"{flag}: {names} in {folder} {'is a clip' if len(clips) == 1 else 'are clips'}, skipped: only photos "
             f"({', '.join(IMAGE_EXTENSIONS)}) are read ({photos_only}); save frames as images to train on them")
    if not list_images(folder, clips=photos_only is None):
        what, read = ("images", IMAGE_EXTENSIONS) if photos_only else ("images or clips",
                                                                      IMAGE_EXTENSIONS + CLIP_EXTENSIONS)
        raise UsageError(f"{flag}: no {what} ({', '.join(read)}) in {folder}; add at least one")


def _check_masks(opts: TrainOptions) -> list[tuple[str, Path]]:
    """Every training image has its mask in --mask_dir; returns (flag, mask) pairs for the image checks."""
    check_folder("--mask_dir", opts.mask_dir, "pass the folder of masks (or drop the flag)")
    pairs = []
    for image in instance_items(opts):
        mask = find_mask(opts.mask_dir, image)
        if mask is None:
            raise UsageError(f"--mask_dir: no mask for {image.name} in {opts.mask_dir}; add one with the same name")
        pairs.append(("--mask_dir", mask))
    return pairs


def _check_output_dir(folder: str) -> None:
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir: {folder} is a file; pass a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir: cannot write in {existing}; {WRITABLE_FOLDER}")


def _require(flag: str, package: str, fix: str, cuda_fix: str | None = None) -> None:
    """`flag` needs `package` installed (and a CUDA GPU when `cuda_fix` is given): one line ending in the fix
    otherwise."""
    import torch

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"{flag} needs {package}: {fix}")
    if cuda_fix and not torch.cuda.is_available():
        raise UsageError(f"{flag} needs a CUDA GPU; {cuda_fix}")


def announce_unused(opts: TrainOptions, given: set[str]) -> None:
    """A note for each flag given (on the command line or in --config) that has no effect with the others."""
    masked = from_hparams(vars(opts), "train.py").timestep_dependent
    no_prior = (not opts.with_prior_preservation, "without --with_prior_preservation",
                "add --with_prior_preservation to use it")
    no_mask = (not masked, f"with --trainer_class {opts.trainer_class} (no timestep mask)",
               f"pass --trainer_class {opts.family}_tlora (or --tlora) to use it")
    unused = {
        "class_data_dir": no_prior, "prior_loss_weight": no_prior, "min_rank": no_mask, "alpha_rank_scale": no_mask,
        "sig_type": (opts.trainer_type != "ortho_lora", "with --trainer_type lora (it picks T-LoRA's start)",
                     "pass --trainer_type ortho_lora to use it"),
    }
    for name in ("num_val_imgs_per_prompt", "validation_height", "validation_width", "validation_num_frames"):
        unused[name] = (not opts.validation_prompts, "without --validation_prompts",
                        "add --validation_prompts to use it")
    for name in sorted(given & set(unused)):
        idle, why, fix = unused[name]
        if idle:
            note(f"--{name} has no effect {why}; drop it, or {fix}")
