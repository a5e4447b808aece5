"""FLUX.2 [klein] (4B, 9B): MM-DiT attention like FLUX.1, a Qwen3 text encoder, flow matching, timesteps
scaled to 0..1, no guidance embedding (the base models are not guidance-distilled).

Adapters go where they go on FLUX.1 (the authors' choice there): every double-stream block's image and text
projections (`to_q/k/v`, `to_out.0`, `add_q/k/v_proj`; not `to_add_out`, which FLUX.1's T-LoRA leaves alone
too) and every single-stream block's q, k and v. FLUX.2's single blocks compute q, k, v and the MLP input
in one fused Linear, `to_qkv_mlp_proj` (as BFL's original `linear1`); each of q, k, v gets its own adapter on
its rows of that layer (RowAdapters), so a FLUX.2 T-LoRA has the same adapters, ranks and masks as a FLUX.1
one. The MLP rows and the fused output projection (`to_out`, attention and MLP together) stay untouched.
Exports fuse the three into one LoRA on `to_qkv_mlp_proj` (kohya: `linear1`) with zero MLP rows, exactly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from tlora.families.architectures import FLOW
from tlora.families.base import Family, Target
from tlora.families.flux import (
    DOUBLE,
    DOUBLE_PROJECTIONS,
    LAYER_KINDS,
    QKV,
    SINGLE,
    authors_samples_name,
    bfl_double_targets,
    double_block_layers,
    flow_matching_noisy,
    from_thousandths,
    fused_single_targets,
    mmdit_layer_kind,
)
from tlora.families.tiny_parts import flow_scheduler, qwen_tokenizer
from tlora.method.denoiser import Layer

FUSED = "to_qkv_mlp_proj"
IN_FUSED = {proj: f"to_qkv_mlp_{proj[-1]}_lora" for proj in QKV}  # to_q -> to_qkv_mlp_q_lora
# Keys that name a layer FLUX.1 does not have (ours, and LyCORIS's for SimpleTuner's FLUX.2 files).
ONLY_KLEIN = re.compile(r"to_qkv_mlp|single_transformer_blocks[._]\d+[._]attn[._]to_out"
                        r"|ff(_context)?[._]linear_(in|out)")
MLP_RATIO = 3.0  # Flux2Transformer2DModel's default and klein's


# the published model, for the estimator (keys left out take the classes' defaults, which are its values)
PUBLISHED = {
    "klein-4b": {
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


def mlp_rows(meta: dict[str, str]):
    """The MLP rows of a fused single-block layer for a projection width (SwiGLU: gate and value), from the
    checkpoint's recorded mlp_ratio."""
    ratio = float(meta.get("mlp_ratio") or MLP_RATIO)
    return lambda inner: 2 * int(inner * ratio)


class Klein(Family):
    """Built from FLUX.1's parts (its double blocks' adapters and keys, BFL's kohya names, flow matching, t / 1000),
    with its own: the fused single blocks, the Qwen3 prompt, FLUX.2's latent space, no authors' files."""

    name = "klein"
    pipeline_class = Flux2KleinPipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("timestep", 2)
    timestep_divisor = 1000
    timestep_cast = True  # `t.expand(b).to(latents.dtype)` before `timestep / 1000`
    # the authors' FLUX defaults (one code path with FLUX.1), without --guidance_scale: no guidance embedding
    train_defaults = {
        "trainer_type": "lora", "trainer_class": "klein_lora", "lora_rank": 16, "min_rank": 16,
        "checkpointing_steps": 100, "optimizer": "prodigy", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "max_sequence_length": 512,
    }
    resize_first = True
    resolution_multiple = 16  # VAE factor 8 times the 2x2 latent packing
    inference_steps, inference_guidance = 50, 4.0  # Flux2KleinPipeline's defaults (the base models)
    distilled_sampling = ("the step-distilled FLUX.2 [klein] models", 4, 1.0)  # the base ones record is_distilled
    gpu_dtype = "bf16"
    key_prefixes = ("transformer_blocks", "single_transformer_blocks")
    rank_rule = "multiply_first"  # one code path with FLUX.1
    masked_by_default, masked_by_default_why = False, "no mask: without --tlora, as on FLUX.1"
    layer_kinds = LAYER_KINDS
    projections = DOUBLE_PROJECTIONS | {key: proj for proj, key in IN_FUSED.items()}
    kohya_base_model = "flux2_klein"
    pipelines = ("Flux2KleinPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "Qwen3 (the prompt in klein's chat template)", "max_sequence_length", True)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, Flux2Transformer2DModel)

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        return ONLY_KLEIN.search(key) is not None

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """FLUX.1's double-block adapters; a single block's q, k, v on the first three blocks of rows of its fused
        to_qkv_mlp_proj, one adapter each."""
        out: list[Layer] = []
        for name, module in model.named_modules():
            if DOUBLE.match(name):
                out += double_block_layers(name)
            elif SINGLE.match(name):
                inner = module.inner_dim
                out += [Layer(f"{name}.processor.{key}", f"{name}.{FUSED}", (i * inner, (i + 1) * inner))
                        for i, key in enumerate(IN_FUSED.values())]
        return out

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return mmdit_layer_kind(prefix)

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """Flux2KleinPipeline calls the transformer with t / 1000, as FluxPipeline."""
        return from_thousandths(timestep)

    @classmethod
    def call_kwargs(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The prompt length as trained."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        """Latents of in_channels / 4 channels before FLUX.2's 2x2 patches, and the Qwen3 embeddings."""
        c, side = model.config, resolution // 8
        return {"mean": (1, c.in_channels // 4, side, side), "std": (1, c.in_channels // 4, side, side),
                "prompt_embeds": (1, max_sequence_length, c.joint_attention_dim)}

    @classmethod
    def samples_name(cls, steps: int, guidance: float) -> str:
        return authors_samples_name(steps, guidance)

    @classmethod
    def model_metadata(cls, model: nn.Module) -> dict[str, str]:
        """What exports need beyond the adapters: the width of the fused layer's MLP rows."""
        return {"mlp_ratio": str(float(model.config.mlp_ratio))}

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, getattr(pipe.vae, "quant_conv", None)]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """Qwen3 hidden states of three layers side by side (1, max_sequence_length, 3 x hidden), via diffusers."""
        embeds, _ = pipe.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching as on FLUX.1, in FLUX.2's latent space: the VAE latent in 2x2 patches, normalised by the
        VAE's batch-norm statistics (as Flux2KleinPipeline encodes and decodes)."""
        mean, vae = batch["mean"], pipe.vae
        latents = Flux2KleinPipeline._patchify_latents(mean + batch["std"] * torch.randn_like(mean))
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        latents = (latents - bn_mean) / bn_std
        noisy, noise, sigma = flow_matching_noisy(latents, scheduler)
        b, c, h, w = latents.shape
        embeds = batch["prompt_embeds"]
        flag = torch.full((b,), guidance or 1.0, device=latents.device) if model.config.guidance_embeds else None
        pred = model(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy).to(dtype), timestep=sigma, guidance=flag,
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds).to(latents.device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(noisy).to(latents.device), return_dict=False,
        )[0]
        return pred.transpose(1, 2).reshape(b, c, h, w), noise - latents

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """BFL's layers (`double_blocks.{i}.img_attn.qkv`, `.txt_attn.qkv`, `.img_attn.proj`,
        `single_blocks.{j}.linear1`), the layout ComfyUI and diffusers read for FLUX.2."""
        double = {m: w for m, w in widths.items() if m.startswith("transformer_blocks.")}
        return bfl_double_targets(double) + fused_single_targets(
            widths, lambda block: f"single_blocks.{block}.linear1", mlp_rows(meta))

    @classmethod
    def diffusers_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """The double blocks' projections as they are; each single block's q, k, v fused into `to_qkv_mlp_proj`."""
        double = {m: w for m, w in widths.items() if m.startswith("transformer_blocks.")}
        return [Target(m, w, {m: 0}) for m, w in double.items()] + fused_single_targets(
            widths, lambda block: f"single_transformer_blocks.{block}.attn.{FUSED}", mlp_rows(meta))

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of black-forest-labs/FLUX.2-klein-base-4B (a Qwen3 text encoder with a byte-level
        BPE tokenizer and a chat template, a transformer without guidance embedding, AutoencoderKLFlux2 with its
        batch-norm statistics, the flow-matching scheduler config) at toy sizes; `wide`: a wider text encoder,
        three heads of 8, one double and three single blocks."""
        folder = Path(folder)
        torch.manual_seed(seed)
        width = 24 if wide else 16  # the text encoder's; the prompt embeddings are three of its layers side by side
        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(  # 27 layers: the pipeline stacks hidden states 9, 18 and 27
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=27,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKLFlux2(
            block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1 if wide else 2, num_single_layers=3 if wide else 2,
            attention_head_dim=8 if wide else 16, num_attention_heads=3 if wide else 2, joint_attention_dim=3 * width,
            timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2) if wide else (4, 4, 4, 4), guidance_embeds=False,
        )
        pipe = Flux2KleinPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)
        pipe.save_pretrained(folder)
        return folder
