"""Stable Diffusion 1.5 (and 2.x-style UNets): UNet attention as on SDXL, one CLIP text encoder, DDPM epsilon (or
v, as the scheduler config says), integer timesteps 0..999 passed to the UNet as they are.

Adapters go where they go on SDXL: every Attention's `to_q`, `to_k`, `to_v`, `to_out.0` (self and cross), with the
same keys. The authors released no SD 1.5 code: no `authors` export, and the mask is tlora's default.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel

from tlora.families.architectures import CLIP_TEXT, SD_VAE
from tlora.families.base import Family
from tlora.families.sdxl import PROJECTIONS, ddpm_noisy, original_unet_names, unet_fused, unet_layers
from tlora.families.tiny_parts import TEXT_DIM, clip_text_config, clip_tokenizer
from tlora.method.denoiser import Layer

# SD 1.x / 2.x UNets have attention in their first down block and none in their first up block; SDXL's are the
# other way round and have up to 10 transformer blocks per attention (SD: one).
ONLY_SD = re.compile(r"down_blocks[._]0[._]attentions")
NOT_SD = re.compile(r"up_blocks[._]0[._]attentions|transformer_blocks[._][1-9]")
SCHEDULER = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)

# the published model, for the estimator: stable-diffusion-v1-5/stable-diffusion-v1-5 (keys left out take the
# classes' defaults, which are its values; no safety checker: tlora loads the pipeline without it)
PUBLISHED = {
    "sd15": {
        "unet": ("diffusers", "UNet2DConditionModel", dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)),
        "vae": ("diffusers", "AutoencoderKL", dict(SD_VAE, sample_size=512, scaling_factor=0.18215, force_upcast=True)),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_TEXT),
        "scheduler": ("diffusers", "PNDMScheduler", SCHEDULER),
    },
}


class SD15(Family):
    name = "sd15"
    pipeline_class = StableDiffusionPipeline
    model_attr = "unet"
    training_scheduler = DDPMScheduler  # DDPM with the model's betas and prediction type
    timestep_arg = ("timestep", 1)  # StableDiffusionPipeline: self.unet(latent_model_input, t, ...)
    default_vae = None
    train_defaults = {  # the authors' SDXL defaults (the classic DreamBooth base has no T-LoRA code of theirs)
        "trainer_type": None, "trainer_class": None, "lora_rank": 4, "min_rank": 1,
        "checkpointing_steps": 200, "optimizer": "adamw", "max_grad_norm": None, "mixed_precision": "no",
        "num_val_imgs_per_prompt": 5, "placeholder_token": None,
        "resolution": 512,  # its native size (train.py's default for it; 1024 for the families without one)
    }
    inference_steps, inference_guidance = 50, 7.5  # StableDiffusionPipeline.__call__'s defaults
    gpu_dtype = "fp16"
    key_prefixes = ("down_blocks", "mid_block", "up_blocks")
    rank_rule = "divide_first"  # a UNet, as the authors' SDXL code rounds
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default"
    layer_kinds = {"self": "self-attention", "cross": "cross-attention"}
    projections = {key: proj for proj, key in PROJECTIONS.items()}
    kohya_base_model = "sd_v1"
    pipelines = ("StableDiffusionPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "CLIP text encoder", None, False)]
    fit_by_quantizing = False  # SD 1.5 fits without a 4-bit base

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        """A UNet without addition embeddings (SDXL's has `text_time`)."""
        return isinstance(model, UNet2DConditionModel) and model.config.addition_embed_type is None

    @classmethod
    def owns_key(cls, key: str) -> bool:
        return super().owns_key(key) and NOT_SD.search(key) is None

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        return ONLY_SD.search(key) is not None

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        return unet_layers(model)

    @classmethod
    def fused(cls, attention: nn.Module) -> bool:
        return unet_fused(attention)

    @classmethod
    def original_names(cls, modules: list[str]) -> dict[str, str]:
        """The original (LDM) UNet layout kohya's keys use, `input_blocks.1.1.transformer_blocks.0.attn1.to_q`, as
        ComfyUI maps it (comfy/utils.py unet_to_diffusers)."""
        return original_unet_names(modules)

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return "self" if ".attn1." in prefix else "cross"

    @classmethod
    def prepare(cls, pipe, dtype: torch.dtype) -> None:
        """Euler for sampling, from the model's scheduler config (as on SDXL: a scheduler that counts its steps, for
        tlora.scheduled); no safety checker (it would black out samples, and the estimate leaves it out)."""
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.register_modules(safety_checker=None)

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, getattr(pipe.vae, "quant_conv", None)]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """CLIP's last hidden states (1, 77, 768), via diffusers' own code."""
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return {"prompt_embeds": embeds}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        c, side = model.config, resolution // 8
        return {"mean": (1, c.out_channels, side, side), "std": (1, c.out_channels, side, side),
                "prompt_embeds": (1, 77, c.cross_attention_dim)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """diffusers' train_dreambooth_lora.py: latents times the VAE's scaling factor, DDPM noise at integer
        timesteps in [0, T), target the noise (epsilon) or the velocity (v_prediction)."""
        mean = batch["mean"]
        latents = (mean + batch["std"] * torch.randn_like(mean)) * pipe.vae.config.scaling_factor
        noisy, target, timesteps = ddpm_noisy(latents, scheduler)
        pred = model(noisy.to(dtype), timesteps, batch["prompt_embeds"].to(dtype), return_dict=False)[0]
        return pred, target

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of stable-diffusion-v1-5/stable-diffusion-v1-5 (one CLIP text encoder, a UNet with
        attention in all but its lowest level and no addition embeddings, its PNDM scheduler config, no safety
        checker) at toy sizes; `wide`: SD 2.x style (linear projections), three levels, other widths and heads."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(folder / "_tok")
        levels = 3 if wide else 2
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32, 48) if wide else (32, 64), layers_per_block=1 if wide else 2, sample_size=16,
            in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=(2, 4, 3) if wide else 2, use_linear_projection=wide, cross_attention_dim=TEXT_DIM,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(clip_text_config(len(tokenizer), False)), tokenizer=tokenizer,
            unet=unet, scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)
        return folder
