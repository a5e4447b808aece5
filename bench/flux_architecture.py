"""FLUX.1-dev's architecture (black-forest-labs/FLUX.1-dev's configs) with random weights, built in memory with
no download: for benchmarks only. `heads` < 24 narrows the transformer (24 heads x 128 = 3072 wide, 12 B
parameters; 6 heads = 768 wide, about 0.8 B) keeping all 19 double and 38 single blocks; the T5 encoder
keeps T5-XXL's width (4096, what the transformer reads) but has `t5_layers` layers (XXL: 24)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from tlora.families.tiny_parts import t5_tokenizer, write_tokenizer

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def build_flux_architecture(heads: int = 24, t5_layers: int = 1, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    folder = Path(tempfile.mkdtemp(prefix="flux-tok-"))
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
                eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)),
        vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240,
                                               num_layers=t5_layers, num_heads=64, feed_forward_proj="gated-gelu")),
        tokenizer_2=t5_tok, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.to(dtype=dtype)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
