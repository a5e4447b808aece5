"""The public API: attach a trained T-LoRA to any diffusers SDXL or FLUX pipeline (or its UNet /
transformer), scale it, unload it.

    pipe = StableDiffusionXLPipeline.from_pretrained(..., dtype=torch.float16).to("cuda")   # or FluxPipeline
    tlora.load(pipe, "RUN/checkpoint-800", "RUN/logs/hparams.yml")
    image = pipe("a photo of sks dog on the beach").images[0]
    tlora.set_scale(pipe, 0.5)     # 0 = the base model
    tlora.unload(pipe)             # the original model, exactly

The mask follows the denoiser's timestep, so text-to-image, img2img, inpainting and ControlNet pipelines,
and any scheduler, all get the right T-LoRA mask at every step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from . import families
from .adapters import TRAINER_CLASSES, TRAINER_TYPES, timestep_dependent
from .checkpoint import check_made_with, infer_rank, infer_trainer_type, read_header, read_weights, weights_path
from .injection import TLoRA, attach, attached
from .lycoris_files import is_lycoris, load_lycoris
from .run_folder import read_hparams
from .usage import UsageError

# When nothing else says: the authors' defaults (SDXL: sdxl_tlora, min_rank 1; FLUX: no mask unless --tlora).
DEFAULTS = {"min_rank": 1, "alpha_rank_scale": 1.0, "sig_type": "last"}
DEFAULT_CLASS = {"sdxl": "sdxl_tlora", "flux": "flux_lora"}


def _unet(pipe_or_unet: Any) -> nn.Module:
    return families.denoiser(pipe_or_unet)


def checkpoint_family(shapes: dict, metadata: dict[str, str], hparams: dict | None = None) -> str:
    """The family a checkpoint was trained on: hparams, then the file's metadata, then its keys."""
    recorded = (hparams or {}).get("family") or metadata.get("family")
    if recorded:
        return families.get(str(recorded)).name
    return "flux" if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in shapes) else "sdxl"


def usable(shapes: dict, family: str) -> dict:
    """The checkpoint's entries without the keys the family's authors write but never use."""
    ignored = families.get(family).ignored_key
    return {k: v for k, v in shapes.items() if not ignored(k)}


def _convert(merged: dict, key: str, kind: type) -> Any:
    try:
        value = kind(merged[key])
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be {kind.__name__}, got {merged[key]!r}") from None
    return value


def check_settings(cfg: dict, family: str | None = None) -> None:
    """The T-LoRA settings make sense on their own, and for `family` (one-line UsageError naming the setting)."""
    for key, allowed in (("trainer_type", TRAINER_TYPES), ("trainer_class", TRAINER_CLASSES)):
        if cfg[key] not in allowed:
            raise UsageError(f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if family is not None and not cfg["trainer_class"].startswith(family + "_"):
        raise UsageError(f"trainer_class {cfg['trainer_class']} was trained on another model family; "
                         f"this is a {family} model")
    if not 1 <= cfg["min_rank"] <= cfg["lora_rank"]:
        raise UsageError(f"min_rank must be between 1 and lora_rank ({cfg['lora_rank']}), got {cfg['min_rank']}")
    if not (math.isfinite(cfg["alpha_rank_scale"]) and cfg["alpha_rank_scale"] > 0):
        raise UsageError(f"alpha_rank_scale must be a finite number > 0, got {cfg['alpha_rank_scale']}")


def settings(shapes: dict, metadata: dict[str, str], hparams: dict | str | Path | None, family: str = "sdxl",
             **overrides: Any) -> dict:
    """T-LoRA settings: explicit overrides, then hparams, then the file's metadata, then the tensors, then defaults.
    `shapes` maps the checkpoint's keys to tensors or shapes; `family` is the model's."""
    given = read_hparams(hparams) if isinstance(hparams, (str, Path)) else dict(hparams or {})
    found = {"trainer_type": infer_trainer_type(shapes), "lora_rank": infer_rank(shapes)}
    defaults = DEFAULTS | {"trainer_class": DEFAULT_CLASS[family]}
    merged = {**defaults, **found, **metadata, **given, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = {key: _convert(merged, key, kind) for key, kind in (
        ("trainer_type", str), ("trainer_class", str), ("lora_rank", int), ("min_rank", int), ("alpha_rank_scale", float))}
    check_settings(cfg, family)
    return cfg


def load(
    pipe_or_unet: Any, checkpoint: str | Path, hparams: dict | str | Path | None = None, scale: float = 1.0, **overrides: Any
) -> TLoRA:
    """Attach the T-LoRA in `checkpoint` (a checkpoint folder, its .safetensors file, or the authors'
    FLUX lora.pt) to an SDXL or FLUX pipeline, UNet or transformer.

    `hparams` (a run's hparams.yml path or a dict) or keyword overrides give trainer_class, lora_rank,
    min_rank and alpha_rank_scale; without them the file's metadata is used (our files), then what the
    tensors tell (type and rank) and the authors' defaults (min_rank 1, alpha 1; sdxl_tlora on SDXL,
    flux_lora (no mask) on FLUX, as their FLUX code without --tlora).
    Adapters are float32 on the model's device: load after moving the pipeline to its device and dtype.
    SimpleTuner / LyCORIS T-LoRA files load too (settings from their lycoris_config; see lycoris_files).
    """
    path = weights_path(checkpoint)
    shapes, metadata = read_header(path)
    family = families.of_model(pipe_or_unet).name
    check_scale(scale)
    scheduler = getattr(pipe_or_unet, "scheduler", None)
    timesteps = scheduler.config.num_train_timesteps if scheduler is not None else 1000
    if is_lycoris(shapes):  # SimpleTuner / LyCORIS: its own settings, its frozen start rebuilt by LyCORIS
        tlora = load_lycoris(_unet(pipe_or_unet), read_weights(path)[0], metadata, timesteps)
        tlora.set_scale(scale)
        return tlora
    shapes = usable(shapes, family)
    cfg = settings(shapes, metadata, hparams, family, **overrides)
    check_made_with(shapes, cfg["trainer_type"], cfg["lora_rank"], where=str(path))
    weights = usable(read_weights(path)[0], family)
    tlora = attach(
        _unet(pipe_or_unet), cfg["trainer_type"], cfg["lora_rank"], cfg["min_rank"], cfg["alpha_rank_scale"],
        timestep_dependent=timestep_dependent(cfg["trainer_class"]), init=False, num_train_timesteps=timesteps,
    )
    try:
        tlora.load_state_dict(weights)
    except (KeyError, ValueError):
        tlora.unload()
        raise
    tlora.set_scale(scale)
    return tlora


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"scale must be a finite number, got {scale!r}")


def _require(pipe_or_unet: Any) -> TLoRA:
    tlora = attached(_unet(pipe_or_unet))
    if tlora is None:
        raise ValueError("no T-LoRA is attached to this pipeline or UNet")
    return tlora


def set_scale(pipe_or_unet: Any, scale: float) -> None:
    """Scale the adapters' output (1 = as trained, 0 = the base model)."""
    check_scale(scale)
    _require(pipe_or_unet).set_scale(scale)


def unload(pipe_or_unet: Any) -> None:
    """Remove the T-LoRA: the model's modules and outputs are exactly as before `load`."""
    _require(pipe_or_unet).unload()
