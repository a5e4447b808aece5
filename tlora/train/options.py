"""train.py's options from one typed description: `TrainOptions`, a dataclass with a field per flag.

Each field's metadata holds its help, the authors' other names for it (their FLUX code's `--rank`,
`--instance_data_dir`, ...) and its choices; the command line, the `--config` YAML file (checked against the
same types) and hparams.yml (every field) all come from it. A flag whose default differs between model
families defaults to None here and takes its family's (`Family.train_defaults`) once the model is known.

    parse_args(argv) = read flags over --config -> resolve the family and its defaults (reads model_index.json)
                       -> validate (pure checks of the values) -> check the inputs (files, images, packages)
                       -> resolve the run to resume (reads run folders)
Every step runs before any model is loaded and fails with one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tlora import families
from tlora.common.errors import UsageError
from tlora.common.flags import Parser, check_utf8
from tlora.common.hub import check_model_source
from tlora.common.prompts import PROMPTS_HELP
from tlora.common.redaction import REDACTED, SECRET_KEYS, redact_argv
from tlora.common.text_files import load_yaml, read_text
from tlora.common.values import shown
from tlora.families.pipelines import BASE_PRECISIONS
from tlora.generate.api import COMPILE_HELP
from tlora.method.adapters import SIG_TYPES, TRAINER_TYPES
from tlora.runs.hparams import TRAINER_CLASSES

LEARNING_RATES = {"adamw": 1e-4, "prodigy": 1.0}  # --learning_rate's default for each --optimizer
OPTIMIZERS = tuple(LEARNING_RATES)


def flag(default: Any = None, help: str = "", *aliases: str, choices: tuple | None = None, kind: type | None = None,
         by_family: bool = False, lower: bool = False) -> Any:
    """A field that is a train.py flag: `aliases` are other names for it, `by_family` marks a default that each
    model family sets (Family.train_defaults), `lower` a value taken case-insensitively."""
    meta = {"help": help, "aliases": aliases, "choices": choices, "kind": kind, "by_family": by_family, "lower": lower}
    return field(default=default, metadata={"flag": meta})


def _validation_side(side: str) -> str:
    return f"Validation image {side} in pixels. Default: the pipeline's own, as inference.py."


def internal(default: Any = None) -> Any:
    """A field set while the options are resolved, recorded in hparams.yml, but not a flag."""
    return field(default=default, metadata={"internal": True})


REQUIRED_ON_UNETS = "Required on SDXL and SD 1.5 (the authors' SDXL flags)."


@dataclass
class TrainOptions:
    """Every train.py flag (the authors' SDXL flags, their FLUX names as aliases, and ours), then what resolving
    the options adds."""

    config: str | None = flag(None, "YAML file of flag values; flags on the command line override it.")
    trainer_type: str | None = flag(None, "lora (Vanilla T-LoRA) or ortho_lora (T-LoRA). " + REQUIRED_ON_UNETS,
                                    choices=TRAINER_TYPES, by_family=True)
    trainer_class: str | None = flag(None, "<family>_tlora (timestep mask) or <family>_lora (no mask). "
                                     + REQUIRED_ON_UNETS, choices=TRAINER_CLASSES, by_family=True)
    tlora: bool = flag(False, "The authors' FLUX flag: the timestep mask (= --trainer_class <family>_tlora).")
    project_name: str = flag("tlora", "W&B project.")
    wandb_api_key: str | None = flag(None, "W&B key (or set WANDB_API_KEY). Never written to disk.")
    report_to: str | None = flag(None, "Tracker. Default: wandb when a W&B key is given, else none.",
                                 choices=("wandb", "tensorboard", "none"))
    seed: int = flag(0)
    pretrained_model_name_or_path: str = flag("stabilityai/stable-diffusion-xl-base-1.0", "The base model (folder or "
                                              "hub id); its model_index.json says which family it is.")
    pretrained_vae_model_name_or_path: str | None = flag(None, "VAE to use; 'none' = the base model's own. Default: "
                                                         "the family's.")
    mixed_precision: str | None = flag(None, "", choices=("no", "fp16", "bf16"), by_family=True)
    base_model_precision: str = flag("auto", "auto: the frozen denoiser in --mixed_precision's dtype. int8-bnb / "
                                     "nf4-bnb (bitsandbytes, CUDA) or int8-torchao / fp8-torchao (torchao): a "
                                     "quantized frozen base, for smaller GPUs.", choices=BASE_PRECISIONS)
    revision: str | None = flag(None)
    num_train_epochs: int = flag(1000, "Number of optimizer steps (--num_train_epochs as the authors' SDXL code names "
                                 "it).", "--max_train_steps")
    checkpointing_steps: int | None = flag(None, "", by_family=True)
    train_data_dir: str | None = flag(None, "Folder of training images. Required.", "--instance_data_dir")
    mask_dir: str | None = flag(None, "Folder of loss masks named as the training images (white = counts); the loss "
                                "is taken on masked prediction and target. 'None' or '' = no mask.")
    alpha_mask: bool = flag(False, "Use each training image's transparency as its loss mask (kohya's --alpha_mask). "
                            "Without it, transparent pixels are composited onto white.")
    train_batch_size: int = flag(1)
    dataloader_num_workers: int = flag(1)
    resolution: int | None = flag(None, "Training image side in pixels. Default: the family's (SD 1.5: 512, Wan: "
                                  "480), else 1024.")
    output_dir: str | None = flag(None, "Folder that receives one run folder per run. Required.")
    class_data_dir: str | None = flag(None, "Folder of class images for prior preservation.")
    prior_loss_weight: float = flag(1.0)
    with_prior_preservation: bool = flag(False)
    class_name: str | None = flag(None, "Class word, e.g. dog. Required.")
    placeholder_token: str | None = flag(None, "Concept token, e.g. sks. " + REQUIRED_ON_UNETS, by_family=True)
    validation_prompts: str | None = flag(None, PROMPTS_HELP, "--validation_prompt")
    num_val_imgs_per_prompt: int | None = flag(None, "", "--num_validation_images", by_family=True)
    validation_height: int | None = flag(None, _validation_side("height"))
    validation_width: int | None = flag(None, _validation_side("width"))
    validation_num_frames: int | None = flag(None, "Video models (Wan): frames per validation video, 4k + 1. "
                                             "Default: 1 (the pipeline's 81 at every checkpoint would outlast the "
                                             "training between them).")
    lora_rank: int | None = flag(None, "", "--rank", by_family=True)
    min_rank: int | None = flag(None, "", by_family=True)
    sig_type: str = flag("last", "", choices=SIG_TYPES)
    alpha_rank_scale: float = flag(1.0)
    optimizer: str | None = flag(None, "", choices=OPTIMIZERS, by_family=True, lower=True)
    learning_rate: float | None = flag(None, "Constant learning rate. Default: 1e-4 with --optimizer adamw, 1.0 with "
                                       "--optimizer prodigy (Prodigy's own step size).")
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_weight_decay: float = flag(1e-4)
    adam_epsilon: float = flag(1e-8)
    max_grad_norm: float | None = flag(None, "Clip the adapters' gradient norm (0 = no clipping).", by_family=True)
    guidance_scale: float | None = flag(None, "The guidance embedding's value during training (guidance-distilled "
                                        "models).", by_family=True)
    max_sequence_length: int | None = flag(None, "Prompt length in text-encoder tokens (FLUX.1: T5, "
                                               "FLUX.2: Qwen3).", by_family=True)
    one_image: str | None = flag(None, "Train on this one file of --train_data_dir only.")
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass: far less GPU memory, "
                                        "about 30% slower.")
    compile: bool = flag(False, COMPILE_HELP + ": faster steps once compiled, the same losses within float tolerance. "
                         "The first steps (and the first validation) compile for a while, minutes on a full-size "
                         "model; a new timestep never recompiles. Off: the authors' eager step.")
    use_8bit_adam: bool = flag(False, "bitsandbytes' 8-bit AdamW (CUDA only).")
    allow_tf32: bool = flag(False, "Allow TF32 matmuls on Ampere and newer GPUs.")
    resume_from_checkpoint: str | None = flag(None, "A checkpoint-N folder, a run folder (its newest complete "
                                              "checkpoint) or 'latest' (the newest run in --output_dir with the same "
                                              "settings; a new run when there is none).")
    checkpoints_total_limit: int | None = flag(None, "Keep only the newest N checkpoint folders.")
    resume_state_total_limit: int = flag(1, "Keep the resume state (optimizer, RNG, data order) in the newest N "
                                         "checkpoints only.")
    # What resolving adds (recorded in hparams.yml, except resume_checkpoint).
    family: str | None = internal()
    argv: list[str] = internal()
    data_sha256: str | None = internal()  # the training images' digest: resume refuses other data
    resume_checkpoint: Path | None = internal()

    @property
    def recipe(self) -> type[families.Family]:
        """The model's family, as resolving the options found it (`family` is its name, as hparams.yml records it)."""
        return families.FAMILIES[self.family]


# -- the command line, from the description -------------------------------------------------------------
def _kind(f) -> type:
    """A field's value type: str, int, float or bool (Optional[X] is X)."""
    hint = typing.get_type_hints(TrainOptions)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return f.metadata["flag"]["kind"] or hint


def flag_fields() -> list:
    return [f for f in fields(TrainOptions) if "flag" in f.metadata]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train a T-LoRA (or a plain LoRA / Ortho-LoRA) on any supported model family.")
    for f in flag_fields():
        meta, kind = f.metadata["flag"], _kind(f)
        names = [f"--{f.name}", *meta["aliases"]]
        help_text = " ".join(filter(None, [meta["help"], _family_default(f.name) if meta["by_family"] else ""]))
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            p.add_argument(*names, dest=f.name, action="store_true", default=f.default, help=help_text)
            continue
        convert = str.lower if meta["lower"] else kind
        p.add_argument(*names, dest=f.name, type=convert, default=f.default, choices=meta["choices"], help=help_text)
    return p


def _family_default(name: str) -> str:
    values = {fam.name.upper(): fam.train_defaults.get(name) for fam in families.FAMILIES.values()}
    if len(set(map(str, values.values()))) == 1:
        return f"Default: {next(iter(values.values()))}."
    return "Default: " + ", ".join(f"{value} ({family})" for family, value in values.items()) + "."


def read_config(path: str) -> dict:
    """The flag values of a --config YAML file (flag names or their aliases), each checked like its flag."""
    fix = "pass a YAML file of flag values"
    if not Path(path).is_file():
        raise UsageError(f"--config: file {path} does not exist; {fix}")
    values = load_yaml(read_text(path, "--config", fix), f"--config: {path}") or {}
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values; {fix}")
    by_name = {name.lstrip("-"): f for f in flag_fields() for name in (f.name, *f.metadata["flag"]["aliases"])}
    out, named = {}, {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in by_name or key == "config":
            raise UsageError(f"--config: unknown key {shown(key)} in {path}; use the flag names of train.py --help")
        name, value = by_name[key].name, _config_value(by_name[key], value, path)
        if name in out and out[name] != value:
            raise UsageError(f"--config: {path} gives {named[name]} and {key}, two names of --{name}, different "
                             "values; drop one of them")
        out[name], named[name] = value, key
    return out


def _config_value(f, value, path: str):
    if value is None:
        return None
    meta, kind, where = f.metadata["flag"], _kind(f), f"--config {path}: --{f.name}"
    echo = REDACTED if f.name in SECRET_KEYS else shown(value)  # a key given as a list is still a key
    allowed = (int, float) if kind is float else kind  # YAML writes 1e-4 as a float and 1 as an int
    if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
        raise UsageError(f"{where} must be {'true/false' if kind is bool else kind.__name__}, got {echo}; fix the file")
    value = value.lower() if meta["lower"] else value
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UsageError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {echo}; fix the file")
    if isinstance(value, str):
        check_utf8(where, value)
    return value


def read_flags(parser: argparse.ArgumentParser, argv: list[str] | None, extra: dict | None = None) -> TrainOptions:
    """The flags over the --config file's values; flags the parser has beyond TrainOptions' go into `extra`."""
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**read_config(first.config))
    values = vars(parser.parse_args(argv))
    names = {f.name for f in fields(TrainOptions)}
    if extra is not None:
        extra.update({k: v for k, v in values.items() if k not in names})
    return TrainOptions(**{k: v for k, v in values.items() if k in names})


# -- the sequence -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> TrainOptions:
    """Parse flags (over --config values), resolve, validate and check them. Raises UsageError on bad input."""
    from tlora.train import checks, resume

    opts = read_flags(build_parser(), argv)
    opts.argv = redact_argv([sys.executable] + list(sys.argv if argv is None else [sys.argv[0], *argv]))
    given = {f.name for f in flag_fields() if getattr(opts, f.name) != f.default}
    resume.resolve_output_dir(opts)
    resolve_family(opts)
    checks.validate(opts)
    checks.check_inputs(opts)
    checks.announce_unused(opts, given)
    make_paths_absolute(opts)
    resume.check(opts)
    return opts


PATHS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "train_data_dir", "class_data_dir",
         "mask_dir", "output_dir", "config", "resume_from_checkpoint")


def make_paths_absolute(opts: TrainOptions) -> None:
    """Local paths as absolute ones, so that the run (hparams.yml, the weights' metadata) works from any folder;
    hub ids and 'none' stay as they are."""
    for name in PATHS:
        value = getattr(opts, name)
        if value and Path(value).expanduser().exists():
            setattr(opts, name, str(Path(value).expanduser().absolute()))


def resolve_family(opts: TrainOptions, known: str | None = None) -> None:
    """The model family (`known`, else from model_index.json: a local file, or the hub's or its cache) and the
    defaults it sets."""
    if known is None:
        check_model_source("--pretrained_model_name_or_path", opts.pretrained_model_name_or_path,
                           revision=opts.revision)
    family = families.get(known or families.detect(opts.pretrained_model_name_or_path, opts.revision))
    opts.family = family.name
    if opts.tlora:
        if opts.trainer_class not in (None, f"{family.name}_tlora"):
            raise UsageError(f"--tlora asks for the timestep mask, but --trainer_class is {opts.trainer_class}; "
                             "drop one of them")
        opts.trainer_class = f"{family.name}_tlora"
    for name, value in family.train_defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.resolution is None:  # a family without a native size of its own in train_defaults
        opts.resolution = 1024
    for name in _owned_by_another_family(family):
        if getattr(opts, name) is not None:
            raise UsageError(f"--{name} is for {_owners(name)} models; {opts.pretrained_model_name_or_path} is "
                             f"{family.name}: drop the flag")
    if opts.learning_rate is None:
        opts.learning_rate = LEARNING_RATES[opts.optimizer]
    if opts.pretrained_vae_model_name_or_path is None:
        opts.pretrained_vae_model_name_or_path = family.default_vae or "none"
    if opts.mask_dir in ("None", "none", ""):  # the authors' scripts pass --mask_dir=None for no mask
        opts.mask_dir = None


def _owned_by_another_family(family) -> set[str]:
    """Flags that only other families give a meaning to (a family that has a flag names it in train_defaults)."""
    every = {f.name for f in flag_fields() if f.metadata["flag"]["by_family"]}
    return {name for name in every if name not in family.train_defaults}


def _owners(name: str) -> str:
    return " or ".join(fam.name.upper() for fam in families.FAMILIES.values() if name in fam.train_defaults)
