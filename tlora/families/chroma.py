"""Chroma (lodestones/Chroma1-HD): FLUX.1-schnell's MM-DiT without CLIP, pooled projection or guidance embedding
(a small approximator network makes every block's modulation from the timestep), one T5 text encoder with an
attention mask over its padding, true classifier-free guidance, flow matching, timesteps scaled to 0..1 as FLUX.1.

Adapters go where they go on FLUX.1: every double-stream block's image and text projections (`to_q/k/v`,
`to_out.0`, `add_q/k/v_proj`) and every single-stream block's `to_q/k/v`, with FLUX.1's keys
(`<block>.attn.processor.to_{q,k,v,out}_lora`, `to_{q,k,v}_proj_lora` for the text stream). Chroma has no authors'
T-LoRA code, so no unused single-block adapters. kohya exports use BFL's names, as ComfyUI's Chroma (a Flux
subclass there) loads them: q, k, v fused into `double_blocks_{i}_{img,txt}_attn_qkv` and `single_blocks_{j}_linear1`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from torch import nn
from transformers import T5Config, T5EncoderModel

from tlora.families.base import Family, Target
from tlora.families.flux import (
    DOUBLE,
    DOUBLE_PROJECTIONS,
    IMAGE,
    LAYER_KINDS,
    ONLY_FLUX1,
    QKV,
    SINGLE,
    bfl_double_targets,
    double_block_layers,
    flow_matching_noisy,
    from_thousandths,
    fused_single_targets,
    mmdit_layer_kind,
)
from tlora.families.flux import PUBLISHED as FLUX_PUBLISHED
from tlora.families.tiny_parts import TEXT_DIM, flow_scheduler, t5_tokenizer
from tlora.method.denoiser import Layer

MLP_RATIO = 4.0  # ChromaSingleTransformerBlock's (fixed in diffusers): BFL's linear1 = q, k, v, then 4 x width MLP rows

# the published model, for the estimator: lodestones/Chroma1-HD's transformer (ChromaTransformer2DModel's defaults,
# as ComfyUI's model_detection reads Chroma's checkpoints: 19 double and 38 single blocks, 24 heads of 128, the
# 5-layer approximator of width 5120); its VAE and T5-XXL are FLUX.1's; the scheduler is left at the class defaults
# (its training timesteps are 1000..1 under FLUX.1's dynamic-shift config and under the unshifted default alike)
PUBLISHED = {
    "chroma1-hd": {
        "transformer": ("diffusers", "ChromaTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56],
            approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)),
        "vae": FLUX_PUBLISHED["flux-dev"]["vae"],
        "text_encoder": FLUX_PUBLISHED["flux-dev"]["text_encoder_2"],
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", {}),
    },
}


@contextmanager
def single_blocks_masked(model: nn.Module, mask: torch.Tensor):
    """For one call of the transformer: its checkpointed single blocks get the attention mask, as the uncheckpointed
    ones do (diffusers' ChromaTransformer2DModel.forward checkpoints them with (hidden_states, temb,
    image_rotary_emb) only; the double blocks get theirs). The mask goes in with the block's inputs, so the
    recomputation in backward uses it too."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    checkpoint = getattr(model, "_gradient_checkpointing_func", None)
    if not getattr(model, "gradient_checkpointing", False) or checkpoint is None:
        yield
        return

    def masked(block, *args):
        single = isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3
        return checkpoint(block, *args, mask) if single else checkpoint(block, *args)

    model._gradient_checkpointing_func = masked
    try:
        yield
    finally:
        model._gradient_checkpointing_func = checkpoint


class Chroma(Family):
    name = "chroma"
    pipeline_class = ChromaPipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("timestep", 2)  # ChromaTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep)
    timestep_divisor = 1000  # ChromaPipeline.__call__: self.transformer(..., timestep=timestep / 1000, ...)
    timestep_cast = True  # `t.expand(b).to(latents.dtype)` before `timestep / 1000`
    default_vae = None
    # ai-toolkit's Chroma recipe (config/examples/train_lora_chroma_24gb.yaml: rank 16, AdamW 1e-4, bf16, a save
    # every 250 steps); min_rank half the rank as in the paper (64 / 32); no --guidance_scale: no guidance embedding
    train_defaults = {
        "trainer_type": "lora", "trainer_class": "chroma_tlora", "lora_rank": 16, "min_rank": 8,
        "checkpointing_steps": 250, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "max_sequence_length": 512,
    }
    resize_first = True  # as the FLUX families
    resolution_multiple = 16  # VAE factor 8 times the 2x2 latent packing
    inference_steps, inference_guidance = 35, 5.0  # ChromaPipeline.__call__'s defaults (true CFG)
    gpu_dtype = "bf16"  # as FLUX.1, whose activations overflow fp16
    key_prefixes = ("transformer_blocks", "single_transformer_blocks")
    rank_rule = "multiply_first"  # the flow-matching transformer families' rule
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default (no authors' Chroma runs)"
    layer_kinds = LAYER_KINDS
    projections = DOUBLE_PROJECTIONS
    kohya_base_model = "chroma"
    pipelines = ("ChromaPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "T5", "max_sequence_length", False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, ChromaTransformer2DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        out: list[Layer] = []
        for name, _ in model.named_modules():
            if DOUBLE.match(name):
                out += double_block_layers(name)
            elif SINGLE.match(name):
                out += [Layer(f"{name}.processor.{IMAGE[proj]}", f"{name}.{proj}") for proj in QKV]
        return out

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        """A single block's own q, k, v: FLUX.1's layers too, but not FLUX.2's (its are fused)."""
        return ONLY_FLUX1.search(key) is not None

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return mmdit_layer_kind(prefix)

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """BFL's layers, q, k, v fused as ComfyUI's Chroma fuses them (`double_blocks.{i}.img_attn.qkv`,
        `.txt_attn.qkv`, `.img_attn.proj`, `single_blocks.{j}.linear1` whose MLP rows stay zero)."""
        return bfl_double_targets(widths) + fused_single_targets(
            widths, lambda block: f"single_blocks.{block}.linear1", lambda inner: int(inner * MLP_RATIO))

    @classmethod
    def call_kwargs(cls, hparams: dict) -> dict:
        """The prompt length as trained."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """ChromaPipeline calls the transformer with t / 1000, as FluxPipeline: back to t as FLUX.1 does."""
        return from_thousandths(timestep)

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, getattr(pipe.vae, "quant_conv", None)]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """T5 embeddings (1, max_sequence_length, 4096) and Chroma's text mask (1, max_sequence_length): the
        prompt's tokens and one padding token, as ChromaPipeline.encode_prompt makes them."""
        embeds, _, mask, *_ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False,
                                                 max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        """Latents of in_channels / 4 channels (the transformer reads them in 2x2 patches), T5 and its mask."""
        c, side = model.config, resolution // 8
        return {"mean": (1, c.in_channels // 4, side, side), "std": (1, c.in_channels // 4, side, side),
                "prompt_embeds": (1, max_sequence_length, c.joint_attention_dim),
                "prompt_attention_mask": (1, max_sequence_length)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching as on FLUX.1 (sigma = t / 1000, noisy = (1 - sigma) x0 + sigma noise, target = noise - x0)
        in the VAE's shifted and scaled latents; the text mask extended over the image tokens and passed to the
        transformer as ChromaPipeline.__call__ passes it (its _prepare_attention_mask). No guidance embedding.
        Under gradient checkpointing the single blocks get the mask too (see single_blocks_masked)."""
        mean, cfg = batch["mean"], pipe.vae.config
        latents = ((mean + batch["std"] * torch.randn_like(mean)) - cfg.shift_factor) * cfg.scaling_factor
        noisy, noise, sigma = flow_matching_noisy(latents, scheduler)
        b, c, h, w = latents.shape
        packed = ChromaPipeline._pack_latents(noisy, b, c, h, w).to(dtype)
        embeds = batch["prompt_embeds"]
        # an instance method that uses nothing of its instance: called so, it also serves the estimator's bare parts.
        # The mask stays 0/1 floats, which attention adds to its scores rather than masking (diffusers issue 12116):
        # as the pipelines sample, so training sees what sampling does
        mask = ChromaPipeline._prepare_attention_mask(pipe, b, packed.shape[1], dtype, batch["prompt_attention_mask"])
        with single_blocks_masked(model, mask.to(dtype)):
            pred = model(
                hidden_states=packed, timestep=sigma, encoder_hidden_states=embeds.to(dtype),
                txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype),
                img_ids=ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype),
                attention_mask=mask.to(dtype), return_dict=False,
            )[0]
        scale = 2 ** (len(cfg.block_out_channels) - 1)
        return ChromaPipeline._unpack_latents(pred, h * scale, w * scale, scale), noise - latents

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of lodestones/Chroma1-HD (a T5 text encoder, the transformer with its modulation
        approximator, FLUX.1's 16-channel VAE, the flow-matching scheduler config) at toy sizes; `wide`: three heads
        of 8, one double and three single blocks, a wider approximator."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1 if wide else 2, num_single_layers=3 if wide else 2,
            attention_head_dim=8 if wide else 16, num_attention_heads=3 if wide else 2, joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(2, 2, 4) if wide else (4, 4, 8), approximator_num_channels=16,
            approximator_hidden_dim=24 if wide else 32, approximator_layers=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            force_upcast=False,
        )
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        pipe = ChromaPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        pipe.save_pretrained(folder)
        return folder
