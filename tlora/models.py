"""Loading SDXL with diffusers' own classes: the pipeline, its VAE choice, and the training noise scheduler."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from .usage import model_load_error

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_vae(name: str | None, dtype: torch.dtype) -> AutoencoderKL | None:
    """The VAE named by --pretrained_vae_model_name_or_path; None for 'none' (the model's own)."""
    if not name or name.lower() == "none":
        return None
    try:
        return AutoencoderKL.from_pretrained(name, dtype=dtype)
    except OSError as err:  # not found, no network, no access: the user's input, not a bug
        raise model_load_error("--pretrained_vae_model_name_or_path", name, err) from None


def load_pipeline(
    model: str, vae: str | None, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """SDXL with an Euler scheduler (the model's scheduler config), frozen, every part in `dtype`.

    A VAE that needs fp32 (`force_upcast`, e.g. SDXL's own) stays in fp32 when `dtype` is fp16.
    """
    kwargs = {"revision": revision, "dtype": dtype}
    custom_vae = load_vae(vae, dtype)
    if custom_vae is not None:
        kwargs["vae"] = custom_vae
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, **kwargs)
    except OSError as err:
        raise model_load_error("--pretrained_model_name_or_path", model, err) from None
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_scheduler(pipe: StableDiffusionXLPipeline) -> DDPMScheduler:
    """The training scheduler: DDPM with the model's betas and prediction type."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def _encoders(pipe: StableDiffusionXLPipeline) -> list[torch.nn.Module]:
    """The parts only needed to encode: both text encoders and the VAE's encoder half."""
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder, pipe.vae.quant_conv]


def offload_encoders(pipe: StableDiffusionXLPipeline) -> None:
    """Move the encoders to the CPU (a no-op there) once everything they encode is cached."""
    for part in _encoders(pipe):
        if part is not None:
            part.to("cpu")


@contextmanager
def encoders_on(pipe: StableDiffusionXLPipeline, device: torch.device):
    """Bring the encoders to `device` for a while (validation), then back where they were."""
    parts = [p for p in _encoders(pipe) if p is not None]
    before = [next(p.parameters()).device for p in parts]
    for part in parts:
        part.to(device)
    try:
        yield
    finally:
        for part, where in zip(parts, before):
            part.to(where)
