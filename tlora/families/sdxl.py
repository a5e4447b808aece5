"""Stable Diffusion XL: the authors' original family (UNet attention, DDPM epsilon/v target, 0..999 timesteps)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tlora.common.errors import UsageError
from tlora.families.architectures import CLIP_TEXT, SD_VAE
from tlora.families.base import Family
from tlora.families.tiny_parts import TEXT_DIM, clip_text_config, clip_tokenizer
from tlora.method.denoiser import Layer, projections_fused

PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


# the published model, for the estimator (keys left out take the classes' defaults, which are its values)
PUBLISHED = {
    "sdxl": {
        "unet": ("diffusers", "UNet2DConditionModel", dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_TEXT),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", dict(
            CLIP_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280)),
        "scheduler": ("diffusers", "EulerDiscreteScheduler", dict(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)),
    },
}


class SDXL(Family):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    model_attr = "unet"
    training_scheduler = DDPMScheduler  # DDPM with the model's betas and prediction type
    timestep_arg = ("timestep", 1)
    default_vae = "madebyollin/sdxl-vae-fp16-fix"
    train_defaults = {
        "trainer_type": None, "trainer_class": None, "lora_rank": 4, "min_rank": 1,
        "checkpointing_steps": 200, "optimizer": "adamw", "max_grad_norm": None, "mixed_precision": "no",
        "num_val_imgs_per_prompt": 5, "placeholder_token": None,
    }
    inference_steps, inference_guidance = 25, 5.0
    key_prefixes = ("down_blocks", "mid_block", "up_blocks")
    rank_rule = "divide_first"  # the authors' SDXL code
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask; the authors' SDXL runs record it"
    layer_kinds = {"self": "self-attention", "cross": "cross-attention"}
    projections = {key: proj for proj, key in PROJECTIONS.items()}
    kohya_base_model = "sdxl_base_v1-0"
    pipelines = ("StableDiffusionXLPipeline",)
    architectures = PUBLISHED
    fit_by_quantizing = False  # the estimator's --fit stops before a 4-bit base: SDXL fits without one
    tokenizers = [("tokenizer", "CLIP text encoder 1", None, False),
                  ("tokenizer_2", "CLIP text encoder 2", None, False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, UNet2DConditionModel) and model.config.addition_embed_type == "text_time"

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        return unet_layers(model)

    @classmethod
    def fused(cls, attention: nn.Module) -> bool:
        return unet_fused(attention)

    @classmethod
    def original_names(cls, modules: list[str]) -> dict[str, str]:
        """The original (SGM) UNet layout kohya's keys use: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
        return original_unet_names(modules)

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return "self" if ".attn1." in prefix else "cross"

    @classmethod
    def prepare(cls, pipe, dtype: torch.dtype) -> None:
        """Euler for sampling; a VAE that needs fp32 (`force_upcast`, e.g. SDXL's own) stays fp32 under fp16."""
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            pipe.vae.to(torch.float32)

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Embeddings (1, 77, 2048) and pooled (1, 1280) from both text encoders, via diffusers' own code."""
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled": pooled}

    @classmethod
    def encode_pixels(cls, pipe, pixels, crop, resolution, device) -> dict[str, torch.Tensor]:
        return super().encode_pixels(pipe, pixels, crop, resolution, device) | {
            "time_ids": time_ids(crop, resolution)[None].to(device)}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        c, side = model.config, resolution // 8
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return {"mean": (1, c.in_channels, side, side), "std": (1, c.in_channels, side, side), "time_ids": (1, 6),
                "prompt_embeds": (1, 77, c.cross_attention_dim), "pooled": (1, pooled)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        mean = batch["mean"]
        latents = (mean + batch["std"] * torch.randn_like(mean)) * pipe.vae.config.scaling_factor
        noisy, target, timesteps = ddpm_noisy(latents, scheduler)
        pred = model(
            noisy.to(dtype), timesteps, batch["prompt_embeds"].to(dtype),
            added_cond_kwargs={"time_ids": batch["time_ids"].to(dtype), "text_embeds": batch["pooled"].to(dtype)},
        ).sample
        return pred, target


    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text encoders, the second
        with a projection, a `text_time` UNet, its scheduler config) at toy sizes; `wide`: other widths, head counts
        and two layers per block."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(folder / "_tok")
        unet = UNet2DConditionModel(
            block_out_channels=(16, 48) if wide else (32, 64), layers_per_block=2 if wide else 1, sample_size=32,
            in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 3) if wide else (2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2) if wide else (1, 1),
            projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
            cross_attention_dim=2 * TEXT_DIM, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
            scaling_factor=0.13025, force_upcast=False,
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(clip_text_config(len(tokenizer), False)),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tokenizer), True)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
        pipe.save_pretrained(folder)
        return folder


def unet_layers(model: nn.Module) -> list[Layer]:
    """Every Attention's q, k, v, out, in module order (the order of `unet.attn_processors`)."""
    return [
        Layer(f"{name}.processor.{key}", f"{name}.{proj}")
        for name, module in model.named_modules() if isinstance(module, Attention)
        for proj, key in PROJECTIONS.items()
    ]


def unet_fused(attention: nn.Module) -> bool:
    """A UNet's unfuse_qkv_projections only puts the unfused processors back (the flag stays set), so what counts
    is whether a fused processor runs."""
    return projections_fused(attention) and "Fused" in type(getattr(attention, "processor", None)).__name__


def ddpm_noisy(latents: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, target, timesteps) of DDPM training as diffusers' scripts: noise, then t uniform in 0..T-1 (the
    authors' order); the target is the noise, or the velocity for a v_prediction scheduler."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UsageError(f"--pretrained_model_name_or_path: its scheduler's prediction_type "
                         f"{scheduler.config.prediction_type!r} is not epsilon or v_prediction; pass a model whose "
                         "scheduler_config.json has one of them")
    return scheduler.add_noise(latents, noise, timesteps), target, timesteps


def time_ids(crop_size: int, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning: original size (crop, crop), crop top-left (0, 0), target (res, res)."""
    return torch.tensor([crop_size, crop_size, 0, 0, resolution, resolution], dtype=torch.float32)


BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def original_unet_names(modules: list[str]) -> dict[str, str]:
    """Each diffusers UNet module path in the original (LDM / SGM) layout, its layers per block read from the paths."""
    found = [int(m.group(3)) for name in modules if (m := BLOCK.match(name)) and m.group(1) == "down_blocks"]
    per_block = max(found, default=0) + 1
    return {name: sgm_path(name, per_block) for name in modules}


def sgm_path(module: str, layers_per_block: int) -> str:
    """A diffusers SDXL UNet module path in the original (SGM) layout that kohya's keys use."""
    if module.startswith("mid_block.attentions.0."):
        return "middle_block.1." + module[len("mid_block.attentions.0."):]
    m = BLOCK.match(module)
    if m is None:
        raise ValueError(f"cannot map {module} to the SDXL original layout")
    kind, block, attention, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "down_blocks":
        return f"input_blocks.{1 + block * (layers_per_block + 1) + attention}.1.{rest}"
    return f"output_blocks.{block * (layers_per_block + 1) + attention}.1.{rest}"
