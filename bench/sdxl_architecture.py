"""Stable Diffusion XL's real architecture (stabilityai/stable-diffusion-xl-base-1.0's configs) with random
weights, built in memory with no download: for benchmarks only (2.6 B UNet parameters)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tlora.families.tiny_parts import write_tokenizer

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=False,
)
TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


def build_sdxl_architecture(dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """SDXL with random weights; the tokenizer is a small byte-level CLIP tokenizer (token ids < 49408)."""
    folder = Path(tempfile.mkdtemp(prefix="sdxl-tok-"))
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
                eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE), unet=UNet2DConditionModel(**UNET),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_1, **text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2, **text)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.to(dtype=dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
