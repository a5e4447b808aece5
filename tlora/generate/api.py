"""The public API: attach a trained T-LoRA to a diffusers pipeline of any family tlora knows (or to its denoiser, a
UNet or transformer), scale it, unload it.

    pipe = StableDiffusionXLPipeline.from_pretrained(..., dtype=torch.float16).to("cuda")   # or FluxPipeline
    tlora.load(pipe, "RUN/checkpoint-800")      # settings from the file, or the run's logs/hparams.yml
    image = pipe("a photo of sks dog on the beach").images[0]
    tlora.set_scale(pipe, 0.5)     # 0 = the base model
    tlora.unload(pipe)             # the original model, exactly
    tlora.load(pipe, "RUN/checkpoint-800", compile=True)   # the denoiser torch.compiled with the T-LoRA in its graph

The mask follows the denoiser's timestep, so text-to-image, img2img, inpainting and ControlNet pipelines,
and any scheduler, all get the right T-LoRA mask at every step.
"""

from __future__ import annotations

import math
from dataclasses import replace
from inspect import signature
from pathlib import Path
from typing import Any

import torch

from tlora import families
from tlora.common.errors import CheckpointError, UsageError
from tlora.common.messages import OWN_FAMILY
from tlora.common.values import shown
from tlora.formats.lycoris import load_lycoris
from tlora.method.injection import TLoRA, attached
from tlora.runs.hparams import known_from_overrides
from tlora.runs.reading import DEFAULT, Checkpoint, read


def load(
    pipe_or_denoiser: Any, checkpoint: str | Path | Checkpoint, hparams: dict | str | Path | None = None,
    scale: float = 1.0, compile: bool = False, **overrides: Any,
) -> TLoRA:
    """Attach the T-LoRA in `checkpoint` (a run folder, a checkpoint folder, its .safetensors file, the authors'
    FLUX lora.pt, a SimpleTuner / LyCORIS file, or a `tlora.read` result) to a pipeline of any family tlora knows, or
    to its denoiser (UNet or transformer).

    Settings are read as `tlora.read` reads them: keyword overrides (trainer_class, min_rank,
    alpha_rank_scale, ...), then the file's metadata, then `hparams` (a hparams.yml path or a dict; by
    default the run's logs/hparams.yml beside the checkpoint), then the tensors, then the authors' defaults,
    each of which is said in one line (an `AssumedSetting` warning) when it changes the result.
    Adapters are float32 on the model's device: load after moving the pipeline to its device and dtype.
    `compile=True` torch.compiles the denoiser with the T-LoRA attached (compile_denoiser): its first call compiles.
    """
    check_scale(scale)
    check_keywords(overrides)
    recipe = families.of_model(pipe_or_denoiser)
    model, family = recipe.model(pipe_or_denoiser), recipe.name
    scheduler = getattr(pipe_or_denoiser, "scheduler", None)
    timesteps = scheduler.config.num_train_timesteps if scheduler is not None else None
    if isinstance(checkpoint, Checkpoint):
        if hparams is not None or overrides:
            raise UsageError("tlora.load: give the hparams and settings to tlora.read, not beside what it returned")
        ckpt, settings = checkpoint, checkpoint.settings.for_family(family, recipe.rank_rule)
        if timesteps is not None and ckpt.sources.get("num_train_timesteps") == DEFAULT:
            settings = replace(settings, num_train_timesteps=timesteps)
    else:
        ckpt = read(checkpoint, hparams, family=family, num_train_timesteps=timesteps, **overrides)
        settings = ckpt.settings
    tensors = ckpt.tensors()  # read (and checked) before anything is attached
    recipe.check_fits(model, list(tensors), str(ckpt.path))
    if ckpt.lycoris:  # SimpleTuner / LyCORIS: LyCORIS rebuilds the frozen start from the model's weights
        tlora = load_lycoris(model, tensors, settings, recipe.describe(model), str(ckpt.path))
    else:
        tlora = recipe.attach(model, settings, init=False)
        try:
            tlora.load_state_dict(tensors)
        except (KeyError, ValueError) as err:
            tlora.unload()
            raise CheckpointError(f"{ckpt.path} does not fit this {family} model ({err.args[0] if err.args else err}); "
                                  "it was trained on another model: load the base model its run names "
                                  "(pretrained_model_name_or_path in its hparams.yml)") from None
    tlora.set_scale(scale)
    if compile:
        compile_denoiser(tlora)
    return tlora


COMPILE_BACKEND = "inductor"
COMPILE_HELP = f"torch.compile the denoiser with the T-LoRA attached ({COMPILE_BACKEND} backend)"


def compile_denoiser(tlora: TLoRA, backend: str = COMPILE_BACKEND) -> None:
    """torch.compile the denoiser with `tlora` attached: each module a pipeline calls (DenoiserSpec.entries), in place
    (nn.Module.compile), so the pipeline, accelerate, DDP and the checkpoint keys see the same module (no
    `_orig_mod`). With dynamo's wrap_top_frame the mask's pre-hook is traced into the denoiser's graph (else it is
    a graph of its own before it), the mask a tensor in the graph, so a new timestep never recompiles. Dynamo then
    also guards on the modules' hooks: set_scale, unload or another T-LoRA after compiling recompile instead of
    running a graph traced without them."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    with torch._dynamo.config.patch(wrap_top_frame=True):
        for entry in tlora.spec.entries:
            tlora.denoiser.get_submodule(entry).compile(backend=backend)


READ_PARAMETERS = tuple(name for name, p in signature(read).parameters.items() if p.kind is not p.VAR_KEYWORD)


def check_keywords(overrides: dict[str, Any]) -> None:
    """tlora.load's keywords are settings only (known_from_overrides): the family is the model's, and tlora.read's
    own parameters (quiet, fix, num_train_timesteps, ...) are set by tlora.load itself."""
    if "family" in overrides:
        raise UsageError(f"tlora.load: family={shown(overrides['family'])} is not a setting here: the family is the "
                         f"model's; drop it (and {OWN_FAMILY})")
    internal = [key for key in overrides if key in READ_PARAMETERS]
    if internal:
        raise UsageError(f"tlora.load: {internal[0]}= is not a T-LoRA setting (tlora.load sets it itself); drop it, "
                         "or use tlora.read(...) and pass what it returns")
    known_from_overrides(overrides)


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"scale must be a finite number, got {scale!r}; pass one such as 1.0 (as trained) or 0 (off)")


def _require(pipe_or_denoiser: Any) -> TLoRA:
    tlora = attached(families.denoiser(pipe_or_denoiser))
    if tlora is None:
        raise ValueError("no T-LoRA is attached to this pipeline or denoiser; load one with tlora.load(pipe, ...) "
                         "first")
    return tlora


def set_scale(pipe_or_denoiser: Any, scale: float) -> None:
    """Scale the adapters' output (1 = as trained, 0 = the base model)."""
    check_scale(scale)
    _require(pipe_or_denoiser).set_scale(scale)


def unload(pipe_or_denoiser: Any) -> None:
    """Remove the T-LoRA: the model's modules and outputs are exactly as before `load`."""
    _require(pipe_or_denoiser).unload()
