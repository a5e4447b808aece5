"""Z-Image (Turbo; base): a single-stream DiT (S3-DiT), a Qwen3 text encoder, FLUX.1's VAE, flow matching.

The transformer refines the image tokens (`noise_refiner`, modulated by the timestep) and the prompt tokens
(`context_refiner`, not modulated) apart, then runs them as one sequence through `layers`. Adapters go on every
attention projection of all three groups: `to_q`, `to_k`, `to_v`, `to_out.0`
(`<group>.<i>.attention.processor.to_{q,k,v,out}_lora`).

Its timestep is reversed: ZImagePipeline calls the transformer with (1000 - t) / 1000 (0 is pure noise) and
steps the scheduler with the negated output, so the transformer predicts x0 - noise; training calls it the same
way and compares the negated prediction with noise - x0, as diffusers' train_dreambooth_lora_z_image.py does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from tlora.families.base import Family, Target
from tlora.families.flux import PUBLISHED as FLUX_PUBLISHED
from tlora.families.flux import flow_matching_noisy
from tlora.families.klein import PUBLISHED as KLEIN_PUBLISHED
from tlora.families.tiny_parts import qwen_tokenizer
from tlora.method.denoiser import Layer

GROUPS = {"noise_refiner": "noise-refiner", "context_refiner": "context-refiner", "layers": "main"}
ATTENTION = re.compile(r"^(" + "|".join(GROUPS) + r")\.\d+\.attention$")
PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
QKV = ("to_q", "to_k", "to_v")
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # a fixed shift, not by size

# The published model, for the estimator: Tongyi-MAI/Z-Image-Turbo's configs (Z-Image, the base model, has the same
# architecture). Keys left out take the classes' defaults (ZImageTransformer2DModel's are this model's: rope_theta
# 256, t_scale 1000, axes_dims [32, 48, 48]; axes_lens, the RoPE table's length, is left to the class).
PUBLISHED = {
    "z-image-turbo": {
        "transformer": ("diffusers", "ZImageTransformer2DModel", dict(
            all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560)),
        "vae": FLUX_PUBLISHED["flux-dev"]["vae"],  # FLUX.1's VAE
        "text_encoder": ("transformers", "Qwen3Model", KLEIN_PUBLISHED["klein-4b"]["text_encoder"][2]),  # Qwen3-4B
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", SCHEDULER),
    },
}


class ZImage(Family):
    name = "zimage"
    pipeline_class = ZImagePipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("t", 1)  # ZImageTransformer2DModel.forward(x, t, cap_feats, ...)
    timestep_divisor = 1000  # the scale only: the pipelines pass (1000 - t) / 1000 (see scheduler_t)
    default_vae = None
    # tlora's T-LoRA (no authors' runs of this family): rank 16 as the FLUX families, min_rank half of it (the
    # paper's ratio); the rest as diffusers' Z-Image DreamBooth recipe (bf16, AdamW, gradient clipping at 1.0,
    # 4 validation images, 512 prompt tokens)
    train_defaults = {
        "trainer_type": "ortho_lora", "trainer_class": "zimage_tlora", "lora_rank": 16, "min_rank": 8,
        "checkpointing_steps": 100, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "max_sequence_length": 512,
    }
    resize_first = True  # diffusers' Z-Image script: resize, then crop
    resolution_multiple = 16  # VAE factor 8 times the transformer's 2x2 patches
    inference_steps, inference_guidance = 50, 5.0  # ZImagePipeline's defaults, for the base model (Z-Image)
    distilled_sampling = ("Z-Image-Turbo", 9, 0.0)  # Tongyi-MAI/Z-Image-Turbo's model card (9 steps: 8 DiT calls)
    gpu_dtype = "bf16"  # as the model is published and sampled
    key_prefixes = tuple(GROUPS)
    rank_rule = "multiply_first"  # as the other flow-matching transformers
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default (no authors' runs of Z-Image)"
    layer_kinds = {"noise-refiner": "noise refiner (image tokens)", "context-refiner": "context refiner (prompt "
                   "tokens)", "main": "main blocks (image and prompt tokens)"}
    projections = {key: proj for proj, key in PROJECTIONS.items()}
    kohya_base_model = "zimage"
    pipelines = ("ZImagePipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "Qwen3 (the prompt in Z-Image's chat template)", "max_sequence_length", True)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, ZImageTransformer2DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Every attention's q, k, v, out in module order (noise refiner, context refiner, main blocks)."""
        return [Layer(f"{name}.processor.{key}", f"{name}.{proj}")
                for name, _ in model.named_modules() if ATTENTION.match(name) for proj, key in PROJECTIONS.items()]

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return GROUPS[prefix.split(".", 1)[0]]

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """The original (Lumina2 NextDiT) layers that ComfyUI loads, q, k, v fused into `qkv` in that order
        (`layers.{i}.attention.qkv`, `.attention.out`): each projection's rows after those before it, at their own
        widths (k and v are n_kv_heads wide, q n_heads: comfy/ldm/lumina/model.py JointAttention); a projection
        the checkpoint lacks is taken as wide as the first it has."""
        targets = []
        for attention in dict.fromkeys(m.partition(".attention.")[0] + ".attention" for m in widths):
            present = [p for p in QKV if f"{attention}.{p}" in widths]
            if present:
                sizes = [widths.get(f"{attention}.{p}", widths[f"{attention}.{present[0]}"]) for p in QKV]
                starts = [sum(sizes[:i]) for i in range(len(QKV))]
                parts = {f"{attention}.{p}": start for p, start in zip(QKV, starts) if p in present}
                targets.append(Target(f"{attention}.qkv", sum(sizes), parts))
            if (out := f"{attention}.to_out.0") in widths:
                targets.append(Target(f"{attention}.out", widths[out], {out: 0}))
        return targets

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """ZImagePipeline calls the transformer with (1000 - t) / 1000: back to t, rounded to 1/1000 so that
        integer training timesteps come back exactly."""
        return torch.round((1 - timestep.float()) * 1_000_000) / 1000

    @classmethod
    def scheduler_t(cls, timestep: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """T-LoRA's t at a scheduler timestep: through the value the pipelines pass, computed as they compute it."""
        t = torch.as_tensor(timestep, dtype=torch.float32)
        return cls.diffusion_t((1000 - t) / 1000)

    @classmethod
    def call_kwargs(cls, hparams: dict) -> dict:
        """The prompt length as trained."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, getattr(pipe.vae, "quant_conv", None)]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """Qwen3's second-to-last hidden states of the prompt's tokens in the chat template, via diffusers' own code,
        zero-padded to (1, max_sequence_length, hidden) with the mask of the real tokens (1, max_sequence_length):
        prompts of other lengths (instance, class) then batch; predict passes the real tokens only, as the pipeline."""
        (embeds,), _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False,
                                          max_sequence_length=max_sequence_length)
        mask = torch.arange(max_sequence_length, device=embeds.device) < len(embeds)
        return {"prompt_embeds": F.pad(embeds, (0, 0, 0, max_sequence_length - len(embeds)))[None],
                "prompt_mask": mask[None]}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        """Latents of in_channels channels at 1/8 of the image side and a prompt of max_sequence_length tokens (no
        prompt_mask: every token counts, the longest prompt)."""
        c, side = model.config, resolution // 8
        return {"mean": (1, c.in_channels, side, side), "std": (1, c.in_channels, side, side),
                "prompt_embeds": (1, max_sequence_length, c.cap_feat_dim)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching: noisy = (1 - sigma) x0 + sigma noise for t drawn from the scheduler's timesteps; the
        transformer gets the per-sample lists and (1000 - t) / 1000 as ZImagePipeline passes them; its output negated
        (as the pipeline steps with it) against noise - x0, latents normalised as FLUX.1's VAE."""
        mean, cfg = batch["mean"], pipe.vae.config
        latents = ((mean + batch["std"] * torch.randn_like(mean)) - cfg.shift_factor) * cfg.scaling_factor
        noisy, noise, sigma = flow_matching_noisy(latents, scheduler)
        embeds, mask = batch["prompt_embeds"].to(dtype), batch.get("prompt_mask")
        prompts = list(embeds) if mask is None else [e[m.bool()] for e, m in zip(embeds, mask)]
        out = model(list(noisy.to(dtype).unsqueeze(2).unbind(0)), 1 - sigma, prompts, return_dict=False)[0]
        return -torch.stack(out).squeeze(2), noise - latents

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of Tongyi-MAI/Z-Image-Turbo (a Qwen3 text encoder with a byte-level BPE tokenizer
        and a chat template, the single-stream transformer with its two refiners, FLUX.1's 16-channel VAE, the
        fixed-shift scheduler config) at toy sizes; `wide`: a wider text encoder, three heads of 8, two refiner
        blocks of each kind and three main blocks."""
        folder = Path(folder)
        torch.manual_seed(seed)
        width = 24 if wide else 16  # the text encoder's: the transformer's caption width
        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        ))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=24 if wide else 32,
            n_layers=3 if wide else 2, n_refiner_layers=2 if wide else 1, n_heads=3 if wide else 2,
            n_kv_heads=3 if wide else 2, cap_feat_dim=width, axes_dims=[2, 2, 4] if wide else [4, 6, 6],
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            force_upcast=False,
        )
        pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        pipe.save_pretrained(folder)
        return folder
