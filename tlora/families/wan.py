"""Wan 2.1 text-to-video (1.3B, 14B): a DiT with self- and cross-attention in every block, a UMT5 text encoder,
a causal 3-D VAE with per-channel latent statistics, flow matching with the scheduler's t passed as it is.

Adapters go on every block's self-attention (`attn1`) and cross-attention (`attn2`) projections: `to_q`, `to_k`,
`to_v`, `to_out.0`, with the keys `blocks.<i>.attn<1|2>.processor.to_{q,k,v,out}_lora` (as on the other families).
A T-LoRA is trained on photos: each image is a one-frame video, (b, 3, 1, H, W) into the VAE, one latent frame out.

Timestep: WanPipeline calls the transformer with `t.expand(batch)` of its scheduler's timesteps (UniPC with flow
sigmas: int64 `sigma * 1000`, 1000 = pure noise), so the denoiser's timestep is the paper's t itself.
Exports: kohya keys are ComfyUI's names for WAN21 (comfy/ldm/wan/model.py: `blocks.<i>.self_attn.{q,k,v,o}`,
`cross_attn.{q,k,v,o}`), one per projection, which diffusers' WanLoraLoaderMixin reads too (musubi-tuner's layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from tlora.common.errors import UsageError
from tlora.families.base import Family
from tlora.families.flux import flow_matching_noisy
from tlora.families.tiny_parts import TEXT_DIM, t5_tokenizer
from tlora.method.denoiser import Layer

ATTENTION = re.compile(r"^blocks\.\d+\.attn[12]$")
PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
# diffusers' names -> ComfyUI's WanModel names (comfy/ldm/wan/model.py WanAttentionBlock, WanSelfAttention)
COMFY_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
COMFY_PROJECTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
MODULE = re.compile(r"^blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")
VAE_SPATIAL = 8  # AutoencoderKLWan's scale_factor_spatial (Wan 2.1): pixels per latent side
FPS = 16  # Wan 2.1's frame rate (diffusers' WanPipeline example exports at 16)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler_config.json
UNIPC_FLOW = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                  solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                  final_sigmas_type="zero", timestep_spacing="linspace", beta_schedule="linear")
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
                is_encoder_decoder=False, tie_word_embeddings=False)
# the published models, for the estimator: Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan-AI/Wan2.1-T2V-14B-Diffusers
# (transformer sizes as diffusers' convert_wan_to_diffusers.py sets them; keys left out take the classes' defaults,
# which are the 14B's; the VAE is AutoencoderKLWan's defaults, Wan 2.1's VAE). The 14B's scheduler shift is left
# at the class default: the estimator does not use it.
PUBLISHED = {
    "wan2.1-t2v-1.3b": {
        "transformer": ("diffusers", "WanTransformer3DModel", dict(
            patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)),
        "vae": ("diffusers", "AutoencoderKLWan", {}),
        "text_encoder": ("transformers", "UMT5EncoderModel", UMT5_XXL),
        "scheduler": ("diffusers", "UniPCMultistepScheduler", UNIPC_FLOW),
    },
    "wan2.1-t2v-14b": {
        "transformer": ("diffusers", "WanTransformer3DModel", dict(
            patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)),
        "vae": ("diffusers", "AutoencoderKLWan", {}),
        "text_encoder": ("transformers", "UMT5EncoderModel", UMT5_XXL),
        "scheduler": ("diffusers", "UniPCMultistepScheduler", {k: v for k, v in UNIPC_FLOW.items()
                                                               if k != "flow_shift"}),
    },
}


class Wan(Family):
    name = "wan"
    pipeline_class = WanPipeline
    model_attr = "transformer"
    timestep_arg = ("timestep", 1)
    timestep_divisor = 1  # WanPipeline passes the scheduler's t (0..1000) as it is
    default_vae = None
    # public Wan LoRA recipes (musubi-tuner, DiffSynth-Studio): rank 32, AdamW at 1e-4, bf16, gradient norm 1.0;
    # the T-LoRA's r_min at half the rank; the UMT5 prompt length Wan was trained with (text_len 512)
    train_defaults = {
        "trainer_type": "ortho_lora", "trainer_class": "wan_tlora", "lora_rank": 32, "min_rank": 16,
        "checkpointing_steps": 100, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 1, "placeholder_token": "sks", "max_sequence_length": 512,
    }
    resize_first = True  # as diffusers' training scripts: resize, then crop
    resolution_multiple = 16  # the VAE's 8 times the transformer's 2x2 patches (WanPipeline.check_inputs)
    inference_steps, inference_guidance = 50, 5.0  # WanPipeline.__call__'s defaults
    gpu_dtype = "bf16"  # as Wan's own code and diffusers' Wan examples run the transformer
    frames_multiple = 4  # a video's frames are 4k + 1 (the VAE's scale_factor_temporal; WanPipeline rounds to it)
    key_prefixes = ("blocks",)
    rank_rule = "multiply_first"
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default (no authors' Wan runs)"
    layer_kinds = {"self": "self-attention", "cross": "cross-attention"}
    projections = {key: proj for proj, key in PROJECTIONS.items()}
    export_formats = ("diffusers", "kohya", "diffusers-scheduled")
    authors_trainer_types = ()  # the authors released no Wan code
    kohya_base_model = "wan"
    pipelines = ("WanPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "UMT5", "max_sequence_length", False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, WanTransformer3DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Each block's attn1 then attn2: q, k, v, out, in module order."""
        return [Layer(f"{name}.processor.{key}", f"{name}.{proj}")
                for name, _ in model.named_modules() if ATTENTION.match(name) for proj, key in PROJECTIONS.items()]

    @classmethod
    def kohya_keys(cls, modules: list[str]) -> dict[str, str]:
        """ComfyUI's WAN21 names with `_` (comfy/lora.py model_lora_keys_unet): `lora_unet_blocks_0_self_attn_q`."""
        out = {}
        for module in modules:
            block, attention, proj = MODULE.match(module).groups()
            out[module] = f"lora_unet_blocks_{block}_{COMFY_ATTENTION[attention]}_{COMFY_PROJECTION[proj]}"
        return out

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return "self" if ".attn1." in prefix else "cross"

    @classmethod
    def call_kwargs(cls, hparams: dict) -> dict:
        """The prompt length as trained (size and frames are the pipeline's defaults unless asked for)."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def prepare(cls, pipe, dtype: torch.dtype) -> None:
        """Only Wan 2.1's one-transformer text-to-video pipelines; the VAE in float32 under half precision, as
        diffusers' Wan examples load it."""
        if getattr(pipe, "transformer_2", None) is not None or dict(getattr(pipe, "config", {})).get(
                "expand_timesteps"):
            name = getattr(pipe, "name_or_path", None) or "the model"
            raise UsageError(f"--pretrained_model_name_or_path: {name} is a Wan 2.2 model (two expert transformers or "
                             "per-token timesteps), which tlora does not train; pass a Wan 2.1 text-to-video model "
                             "such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        if dtype in (torch.float16, torch.bfloat16):
            pipe.vae.float()  # (not .to(dtype): diffusers warns on every such cast)
        transformer = pipe.transformer
        if next(transformer.parameters()).is_meta:  # built empty (the estimator): its rotary tables, buffers made
            transformer.rope.to("meta")  # at init outside init_empty_weights, go where its parameters are

    @classmethod
    def noise_scheduler(cls, pipe) -> FlowMatchEulerDiscreteScheduler:
        """Flow matching with the training timesteps 1000..1 uniform (no shift): sigma = t / 1000."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
                                               shift=1.0)

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, pipe.vae.quant_conv]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """UMT5 hidden states (1, max_sequence_length, 4096), zero past the prompt's tokens, via diffusers' own code."""
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=device)
        return {"prompt_embeds": embeds}

    @classmethod
    def encode_pixels(cls, pipe, pixels: torch.Tensor, crop: int, resolution: int, device: torch.device
                      ) -> dict[str, torch.Tensor]:
        """The image as a one-frame video (b, 3, 1, H, W): the latent distribution (b, 16, 1, H/8, W/8)."""
        return super().encode_pixels(pipe, pixels[:, :, None], crop, resolution, device)

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        c, side = model.config, resolution // VAE_SPATIAL
        latent = (1, c.in_channels, 1, side, side)
        return {"mean": latent, "std": latent, "prompt_embeds": (1, max_sequence_length, c.text_dim)}

    @classmethod
    def normalised(cls, vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents as the transformer sees them: WanPipeline decodes `latents / (1 / std) + mean`, so this is
        `(latents - mean) * (1 / std)`, per channel."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
        return (latents - mean) * inverse_std

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching: t uniform over 1..1000, sigma = t / 1000, noisy = (1 - sigma) x0 + sigma noise, target =
        noise - x0 (the velocity UniPC's flow_prediction integrates), the transformer called with t as WanPipeline
        calls it. Returned with channels and frames flattened, (b, c * f, h, w): the loss masks are (b, 1, h, w)."""
        mean = batch["mean"]
        latents = cls.normalised(pipe.vae, mean + batch["std"] * torch.randn_like(mean))
        noisy, noise, sigma = flow_matching_noisy(latents.flatten(1, 2), scheduler)  # 4-D, as FLUX's latents
        noisy, noise = noisy.view_as(latents), noise.view_as(latents)
        pred = model(hidden_states=noisy.to(dtype), timestep=torch.round(sigma * 1000),
                     encoder_hidden_states=batch["prompt_embeds"].to(dtype), return_dict=False)[0]
        return pred.flatten(1, 2), (noise - latents).flatten(1, 2)

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (a UMT5 text encoder, the transformer with
        self- and cross-attention blocks, AutoencoderKLWan with its latent statistics, UniPC with flow sigmas) at
        toy sizes; `wide`: three heads of 8 and three blocks."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, is_encoder_decoder=False, tie_word_embeddings=False,
        ))
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=3 if wide else 2, attention_head_dim=8 if wide else 16,
            in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48 if wide else 32,
            num_layers=3 if wide else 2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=UniPCMultistepScheduler(**UNIPC_FLOW))
        pipe.save_pretrained(folder)
        return folder
