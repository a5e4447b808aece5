"""Models built empty (on the `meta` device: shapes, no memory, no weights) from their configs: the published
architectures shipped here by name (`sdxl`, `flux-dev`, `klein-4b`), or any local model folder's configs.

The named configs are those of stabilityai/stable-diffusion-xl-base-1.0 (with the fp16-fix VAE that training
uses by default), black-forest-labs/FLUX.1-dev and black-forest-labs/FLUX.2-klein-base-4B; keys left out take
the classes' defaults, which are those models' values.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tlora.families.base import cast_as_loaded

CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              sample_size=1024, scaling_factor=0.13025, force_upcast=False)
FLOW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)

# name -> {"family", component -> (library, class, config)}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sdxl": {
        "family": "sdxl",
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
    "flux-dev": {
        "family": "flux",
        "transformer": ("diffusers", "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56])),
        "vae": ("diffusers", "AutoencoderKL", dict(SD_VAE, latent_channels=16, scaling_factor=0.3611,
                                                    shift_factor=0.1159, use_quant_conv=False,
                                                    use_post_quant_conv=False, force_upcast=True)),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_TEXT),
        "text_encoder_2": ("transformers", "T5EncoderModel", dict(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", FLOW),
    },
    "klein-4b": {
        "family": "klein",
        "transformer": ("diffusers", "Flux2Transformer2DModel", dict(
            patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, guidance_embeds=False)),
        "vae": ("diffusers", "AutoencoderKLFlux2", {}),
        "text_encoder": ("transformers", "Qwen3ForCausalLM", dict(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000,
            tie_word_embeddings=True)),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", FLOW),
    },
}


def family_of(name: str) -> str | None:
    """The family of a shipped architecture name (None: not one of them)."""
    return ARCHITECTURES.get(name, {}).get("family")


def _components_of_folder(folder: Path) -> dict[str, tuple[str, str, dict]]:
    """(library, class, config) of each model and scheduler of a local model folder (model_index.json)."""
    from tlora.families import model_index

    index = model_index(str(folder))
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        config = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if config.is_file():
            out[name] = (spec[0], spec[1], json.loads(config.read_text()))
    return out


def build_empty(library: str, cls_name: str, config: dict, dtype: torch.dtype) -> Any:
    """One component with its parameters on the `meta` device in `dtype` (a scheduler is built as it is)."""
    from accelerate import init_empty_weights

    module = __import__(library, fromlist=[cls_name])
    cls = getattr(module, cls_name)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if library == "transformers":
        config_cls = cls.config_class
        with init_empty_weights():
            model = cls(config_cls(**config))
    elif hasattr(cls, "from_config") and issubclass(cls, nn.Module):
        with init_empty_weights():
            model = cls.from_config(config)
    else:
        return cls.from_config(config)
    cast_as_loaded(model, dtype)  # in `dtype` as from_pretrained(dtype=...) loads it (T5's wo stays fp32 in fp16)
    return model.requires_grad_(False).eval()


def empty_pipeline(name_or_folder: str, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> SimpleNamespace:
    """Every model of a pipeline on `meta` (the VAE in `vae_dtype` when given) and its scheduler, as attributes."""
    spec = ARCHITECTURES.get(name_or_folder)
    parts = {k: v for k, v in spec.items() if k != "family"} if spec else _components_of_folder(Path(name_or_folder))
    built = {}
    for name, (library, cls_name, config) in parts.items():
        if library not in ("diffusers", "transformers"):
            continue
        built[name] = build_empty(library, cls_name, config, vae_dtype if name == "vae" and vae_dtype else dtype)
    return SimpleNamespace(**built)
