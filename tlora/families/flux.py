"""FLUX.1 (dev): the authors' FLUX release. MM-DiT attention, flow matching, timesteps scaled to 0..1.

Adapters go on every double-stream block's image and text projections (`to_q/k/v`, `to_out.0`,
`add_q/k/v_proj`) and every single-stream block's `to_q/k/v`, with the authors' keys
(`<block>.attn.processor.to_{q,k,v,out}_lora`, `to_{q,k,v}_proj_lora` for the text stream).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from tlora.families.architectures import CLIP_TEXT, FLOW, SD_VAE
from tlora.families.base import Family, Target
from tlora.families.tiny_parts import TEXT_DIM, clip_text_config, clip_tokenizer, flow_scheduler, t5_tokenizer
from tlora.method.denoiser import Layer

DOUBLE = re.compile(r"^transformer_blocks\.\d+\.attn$")
SINGLE = re.compile(r"^single_transformer_blocks\.\d+\.attn$")
IMAGE = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
QKV = ("to_q", "to_k", "to_v")
TEXT = {"add_q_proj": "to_q_proj_lora", "add_k_proj": "to_k_proj_lora", "add_v_proj": "to_v_proj_lora"}
# The authors' single-block processors also make these (in this order) and never use them.
UNUSED_IN_SINGLE = ("to_out_lora", "to_q_proj_lora", "to_k_proj_lora", "to_v_proj_lora")
# Keys that name a layer FLUX.2 does not have: a single block's own q, k, v (ours, the authors', LyCORIS's).
ONLY_FLUX1 = re.compile(r"single_transformer_blocks[._]\d+[._]attn([._]processor)?[._](to_[qkv]_lora|to_[qkv]\b)"
                        r"|proj_mlp")
LAYER_KINDS = {"double-image": "double blocks, image stream", "double-text": "double blocks, text stream",
               "single": "single blocks"}
DOUBLE_PROJECTIONS = {key: proj for proj, key in (IMAGE | TEXT).items()}  # a double block's keys -> projections
MLP_RATIO = 4.0  # FluxSingleTransformerBlock's (fixed in diffusers): linear1 = q, k, v, then 4 x width MLP rows


# the published model, for the estimator (keys left out take the classes' defaults, which are its values)
PUBLISHED = {
    "flux-dev": {
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
}


class FLUX(Family):
    name = "flux"
    pipeline_class = FluxPipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("timestep", 3)
    timestep_divisor = 1000
    timestep_cast = True  # `t.expand(b).to(latents.dtype)` before `timestep / 1000`
    default_vae = None
    train_defaults = {  # the authors' FLUX defaults
        "trainer_type": "lora", "trainer_class": "flux_lora", "lora_rank": 16, "min_rank": 16,
        "checkpointing_steps": 100, "optimizer": "prodigy", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "guidance_scale": 1.0, "max_sequence_length": 512,
    }
    resize_first = True
    resolution_multiple = 16  # VAE factor 8 times the 2x2 latent packing
    inference_steps, inference_guidance = 28, 3.5
    gpu_dtype = "bf16"  # as the authors' FLUX inference; FLUX overflows in fp16
    key_prefixes = ("transformer_blocks", "single_transformer_blocks")
    rank_rule = "multiply_first"  # the authors' FLUX code
    masked_by_default, masked_by_default_why = False, "no mask: the authors' FLUX default, without --tlora"
    layer_kinds = LAYER_KINDS
    projections = DOUBLE_PROJECTIONS
    kohya_base_model = "flux1"
    pipelines = ("FluxPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "CLIP (the pooled prompt embedding)", None, False),
                  ("tokenizer_2", "T5", "max_sequence_length", False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, FluxTransformer2DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        out: list[Layer] = []
        for name, _ in model.named_modules():
            if DOUBLE.match(name):
                out += double_block_layers(name)
            elif SINGLE.match(name):  # q, k, v, and the four layers the authors make there but never use
                out += [Layer(f"{name}.processor.{IMAGE[proj]}", f"{name}.{proj}") for proj in QKV]
                out += [Layer(f"{name}.processor.{key}", None) for key in UNUSED_IN_SINGLE]
        return out

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        return ONLY_FLUX1.search(key) is not None

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """BFL's layers, q, k, v fused as the original model fuses them (`double_blocks.{i}.img_attn.qkv`,
        `.txt_attn.qkv`, `.img_attn.proj`, `single_blocks.{j}.linear1` whose MLP rows stay zero): what ComfyUI, Forge
        and diffusers read."""
        return bfl_double_targets(widths) + fused_single_targets(
            widths, lambda block: f"single_blocks.{block}.linear1", lambda inner: int(inner * MLP_RATIO))

    @classmethod
    def call_kwargs(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The prompt length as trained (the image size is the pipeline's default, as the authors sample)."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return mmdit_layer_kind(prefix)

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """FluxPipeline calls the transformer with t / 1000."""
        return from_thousandths(timestep)

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """T5 embeddings (1, max_sequence_length, 4096) and CLIP pooled (1, 768), via diffusers' own code."""
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        """Latents of in_channels / 4 channels (the transformer reads them in 2x2 patches), T5 and CLIP pooled."""
        c, side = model.config, resolution // 8
        shapes = {"mean": (1, c.in_channels // 4, side, side), "std": (1, c.in_channels // 4, side, side),
                  "prompt_embeds": (1, max_sequence_length, c.joint_attention_dim)}
        if getattr(c, "pooled_projection_dim", None):
            shapes["pooled"] = (1, c.pooled_projection_dim)
        return shapes

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching: sigma = t / 1000 for t drawn from the scheduler's timesteps,
        noisy = (1 - sigma) x0 + sigma noise, target = noise - x0."""
        mean, cfg = batch["mean"], pipe.vae.config
        latents = ((mean + batch["std"] * torch.randn_like(mean)) - cfg.shift_factor) * cfg.scaling_factor
        noisy, noise, sigma = flow_matching_noisy(latents, scheduler)
        b, c, h, w = latents.shape
        embeds = batch["prompt_embeds"]
        flag = torch.full((b,), guidance, device=latents.device) if model.config.guidance_embeds else None
        pred = model(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype), timestep=sigma, guidance=flag,
            pooled_projections=batch["pooled"].to(dtype), encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype),
            return_dict=False,
        )[0]
        scale = 2 ** (len(cfg.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(pred, h * scale, w * scale, scale), noise - latents

    @classmethod
    def samples_name(cls, steps: int, guidance: float) -> str:
        return authors_samples_name(steps, guidance)

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of black-forest-labs/FLUX.1-dev (CLIP + T5 text encoders, a guidance-distilled
        transformer with double- and single-stream blocks, a 16-channel VAE, its scheduler config) at toy sizes;
        `wide`: three heads of 8, one double and three single blocks."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer, t5_tok = clip_tokenizer(folder / "_tok"), t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1 if wide else 2, num_single_layers=3 if wide else 2,
            attention_head_dim=8 if wide else 16, num_attention_heads=3 if wide else 2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4) if wide else (4, 4, 8),
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            force_upcast=False,
        )
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        pipe = FluxPipeline(
            scheduler=flow_scheduler(), vae=vae, text_encoder=CLIPTextModel(clip_text_config(len(tokenizer), True)),
            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
        )
        pipe.save_pretrained(folder)
        return folder


# -- parts other families are built from -----------------------------------------------------------------------


def double_block_layers(name: str) -> list[Layer]:
    """An MM-DiT double block's image (to_q/k/v, to_out.0) and text (add_q/k/v_proj) adapters, with the authors'
    FLUX keys (`<name>.processor.to_q_lora`, ..., `to_q_proj_lora` for the text stream)."""
    return [Layer(f"{name}.processor.{key}", f"{name}.{proj}") for proj, key in (IMAGE | TEXT).items()]


def mmdit_layer_kind(prefix: str) -> str:
    """The LAYER_KINDS kind of an adapter key prefix of a FLUX-like MM-DiT."""
    if prefix.startswith("single_transformer_blocks"):
        return "single"
    return "double-text" if prefix.rsplit(".", 1)[-1] in TEXT.values() else "double-image"


def from_thousandths(timestep: torch.Tensor) -> torch.Tensor:
    """t from the t / 1000 that the FLUX-like pipelines call their transformer with, rounded to 1/1000 so that
    integer training timesteps come back exactly (float32 t / 1000 * 1000 can miss by one ulp)."""
    return torch.round(timestep.float() * 1_000_000) / 1000


def authors_samples_name(steps: int, guidance: float) -> str:
    """The samples folder name of the authors' FLUX code (`ns28gs3.5`)."""
    return f"ns{steps}gs{guidance}"


BFL_DOUBLE = {"img_attn.qkv": QKV, "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
              "img_attn.proj": ("to_out.0",)}


def flow_matching_noisy(latents: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, noise, sigma): t uniform over the scheduler's training timesteps (no shift), sigma = t / 1000,
    noisy = (1 - sigma) x0 + sigma noise; random numbers in the authors' order (noise, then timesteps)."""
    noise = torch.randn_like(latents)
    index = torch.randint(0, len(scheduler.timesteps), (latents.shape[0],), device=latents.device)
    sigma = scheduler.timesteps.to(latents.device)[index].float() / 1000
    s = sigma[:, None, None, None]
    return (1 - s) * latents + s * noise, noise, sigma


def bfl_double_targets(widths: dict[str, int]) -> list[Target]:
    """The double blocks' projections in BFL's layers (`double_blocks.{i}.img_attn.qkv`, ...), q, k, v fused in
    that order."""
    targets = []
    for block in sorted({int(m.split(".")[1]) for m in widths if m.startswith("transformer_blocks.")}):
        attn = f"transformer_blocks.{block}.attn"
        for name, projections in BFL_DOUBLE.items():
            present = [p for p in projections if f"{attn}.{p}" in widths]
            if present:
                inner = widths[f"{attn}.{present[0]}"]
                parts = {f"{attn}.{p}": i * inner for i, p in enumerate(projections) if p in present}
                targets.append(Target(f"double_blocks.{block}.{name}", inner * len(projections), parts))
    return targets


def fused_single_targets(widths: dict[str, int], name: Callable[[int], str], mlp_rows: Callable[[int], int]
                         ) -> list[Target]:
    """Each single block's q, k, v as one fused layer `name(block)`: q, k, v rows, then `mlp_rows(width)` MLP rows
    that the T-LoRA leaves at zero (BFL's linear1; FLUX.2's to_qkv_mlp_proj)."""
    targets = []
    for block in sorted({int(m.split(".")[1]) for m in widths if m.startswith("single_transformer_blocks.")}):
        attn = f"single_transformer_blocks.{block}.attn"
        present = [p for p in QKV if f"{attn}.{p}" in widths]
        inner = widths[f"{attn}.{present[0]}"]
        parts = {f"{attn}.{p}": i * inner for i, p in enumerate(QKV) if p in present}
        targets.append(Target(name(block), 3 * inner + mlp_rows(inner), parts))
    return targets
