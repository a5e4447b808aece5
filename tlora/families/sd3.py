"""Stable Diffusion 3.5 (Medium, Large): MM-DiT joint blocks (an image and a text stream in one attention), three
text encoders (CLIP-L, CLIP-G, T5-XXL), flow matching with shift 3; the transformer is called with the scheduler's
timestep itself (sigma x 1000, no rescaling).

Adapters go on the attention projections of every joint block, both streams: the image stream's `to_q/k/v` and
`to_out.0` (keys `to_{q,k,v,out}_lora`), the text stream's `add_q/k/v_proj` and `to_add_out` (`to_{q,k,v}_proj_lora`,
`to_add_out_lora`), and SD3.5 Medium's second image self-attention `attn2` (its first 13 blocks; the image keys,
under `attn2`). The last block's text stream is pre-only (`context_pre_only`): it has no `to_add_out`, and the
outputs of its text queries are thrown away, so its `add_q_proj` gets no adapter (it could change nothing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import nn
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tlora.families.architectures import CLIP_TEXT, SD_VAE
from tlora.families.base import Family, Target
from tlora.families.tiny_parts import TEXT_DIM, clip_text_config, clip_tokenizer, t5_tokenizer
from tlora.method.denoiser import Layer

ATTENTION = re.compile(r"^transformer_blocks\.\d+\.attn2?$")
IMAGE = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
TEXT = {"add_q_proj": "to_q_proj_lora", "add_k_proj": "to_k_proj_lora", "add_v_proj": "to_v_proj_lora",
        "to_add_out": "to_add_out_lora"}
# Keys only an SD3 T-LoRA has (a FLUX T-LoRA adapts no to_add_out and has no attn2).
ONLY_SD3 = re.compile(r"to_add_out_lora|^(lycoris_)?transformer_blocks[._]\d+[._]attn2[._]")
MODULE = re.compile(r"^transformer_blocks\.(\d+)\.(attn2?)\.(.+)$")
# ComfyUI's (the original MMDiT's) attention Linears, by attention module: name -> the diffusers projections fused
# into it, in row order (comfy/utils.py mmdit_to_diffusers and MMDIT_MAP_BLOCK).
COMFY = {"attn": {"x_block.attn.qkv": ("to_q", "to_k", "to_v"), "x_block.attn.proj": ("to_out.0",),
                  "context_block.attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
                  "context_block.attn.proj": ("to_add_out",)},
         "attn2": {"x_block.attn2.qkv": ("to_q", "to_k", "to_v"), "x_block.attn2.proj": ("to_out.0",)}}
SHIFT = 3.0  # the SD3 models' scheduler shift (scheduler_config.json)

# The published models, for the estimator: the configs of stabilityai/stable-diffusion-3.5-medium and
# stabilityai/stable-diffusion-3.5-large (their config.json files; keys left out take the classes' defaults, which
# are their values: sample_size 128, patch_size 2, in/out_channels 16, joint_attention_dim 4096,
# pooled_projection_dim 2048).
TRANSFORMER = dict(attention_head_dim=64, qk_norm="rms_norm")
VAE = dict(SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
           use_post_quant_conv=False, force_upcast=True)
CLIP_L = dict(CLIP_TEXT)  # SD3 reads its pooled projection: CLIPTextModelWithProjection
CLIP_G = dict(CLIP_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)


def _published(**transformer: Any) -> dict[str, tuple[str, str, dict]]:
    return {
        "transformer": ("diffusers", "SD3Transformer2DModel", dict(TRANSFORMER, **transformer)),
        "vae": ("diffusers", "AutoencoderKL", VAE),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=SHIFT)),
    }


PUBLISHED = {
    "sd3.5-medium": _published(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                               pos_embed_max_size=384, dual_attention_layers=list(range(13))),
    "sd3.5-large": _published(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                              pos_embed_max_size=192),
}


class SD3(Family):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("timestep", 3)  # forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)
    timestep_divisor = 1  # StableDiffusion3Pipeline passes the scheduler's timestep as it is (t.expand(batch))
    default_vae = None
    # No T-LoRA authors' recipe for SD3: the method as the paper runs it (ortho_lora with the mask, the minimum rank
    # half the rank), the rank and checkpoint interval of the authors' FLUX code, and diffusers'
    # train_dreambooth_lora_sd3.py for the rest (AdamW at its 1e-4, gradient clipping at 1.0, 4 validation images,
    # T5 read to 77 tokens).
    train_defaults = {
        "trainer_type": "ortho_lora", "trainer_class": "sd3_tlora", "lora_rank": 16, "min_rank": 8,
        "checkpointing_steps": 100, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "max_sequence_length": 77,
    }
    resize_first = True  # as train_dreambooth_lora_sd3.py: Resize(resolution), then the crop
    resolution_multiple = 16  # VAE factor 8 times the transformer's 2x2 patches
    inference_steps, inference_guidance = 28, 7.0  # StableDiffusion3Pipeline's defaults (the model cards: 3.5-4.5)
    gpu_dtype = "bf16"  # as the SD3.5 model cards run it
    key_prefixes = ("transformer_blocks",)
    rank_rule = "multiply_first"  # a flow-matching transformer, as the authors' FLUX code rounds r(t)
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask, tlora's default; no authors' SD3 runs"
    layer_kinds = {"image": "joint blocks, image stream", "text": "joint blocks, text stream",
                   "self": "image self-attention (attn2, SD3.5 Medium)"}
    projections = {key: proj for proj, key in (IMAGE | TEXT).items()}
    kohya_base_model = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "CLIP-L", None, False), ("tokenizer_2", "CLIP-G", None, False),
                  ("tokenizer_3", "T5", "max_sequence_length", False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, SD3Transformer2DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Every joint block's attention projections that change the output, in module order (attn, then attn2)."""
        return [Layer(f"{name}.processor.{key}", f"{name}.{proj}")
                for name, module in model.named_modules() if ATTENTION.match(name)
                for proj, key in adapted(module).items()]

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        return ONLY_SD3.search(key) is not None

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        if ".attn2." in prefix:
            return "self"
        return "text" if prefix.rsplit(".", 1)[-1] in TEXT.values() else "image"

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """ComfyUI's MMDiT layers, q, k, v fused as that model fuses them (`joint_blocks.{i}.x_block.attn.qkv`,
        `.x_block.attn.proj`, `.context_block.attn.qkv`, `.context_block.attn.proj`, `.x_block.attn2.*`)."""
        groups: dict[tuple[int, str], dict[str, int]] = {}
        for module, width in widths.items():
            block, attention, proj = MODULE.match(module).groups()
            groups.setdefault((int(block), attention), {})[proj] = width
        targets = []
        for (block, attention), present in sorted(groups.items()):
            path = f"transformer_blocks.{block}.{attention}"
            for name, fused in COMFY[attention].items():
                found = [p for p in fused if p in present]
                if found:
                    inner = present[found[0]]
                    parts = {f"{path}.{p}": i * inner for i, p in enumerate(fused) if p in present}
                    targets.append(Target(f"joint_blocks.{block}.{name}", inner * len(fused), parts))
        return targets

    @classmethod
    def call_kwargs(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The T5 prompt length as trained."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or cls.train_defaults["max_sequence_length"]}

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None), pipe.vae.encoder,
                getattr(pipe.vae, "quant_conv", None)]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """CLIP-L and CLIP-G hidden states side by side, zero-padded to T5's width, then T5's
        (1, 77 + max_sequence_length, 4096), and both CLIPs' pooled projections (1, 2048), via diffusers' own code."""
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        c, side = model.config, resolution // 8
        return {"mean": (1, c.in_channels, side, side), "std": (1, c.in_channels, side, side),
                "prompt_embeds": (1, 77 + max_sequence_length, c.joint_attention_dim),
                "pooled": (1, c.pooled_projection_dim)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching as train_dreambooth_lora_sd3.py: latents (x - shift_factor) x scaling_factor, t from the
        scheduler's training timesteps, noisy = (1 - sigma) x0 + sigma noise, the transformer called with t itself,
        target = noise - x0 (its --precondition_outputs 0)."""
        mean, cfg = batch["mean"], pipe.vae.config
        latents = ((mean + batch["std"] * torch.randn_like(mean)) - cfg.shift_factor) * cfg.scaling_factor
        noisy, noise, timestep = flow_matching_at_timesteps(latents, scheduler)
        embeds, pooled = batch["prompt_embeds"].to(dtype), batch["pooled"].to(dtype)
        pred = model(hidden_states=noisy.to(dtype), timestep=timestep, encoder_hidden_states=embeds,
                     pooled_projections=pooled, return_dict=False)[0]
        return pred, noise - latents

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of stabilityai/stable-diffusion-3.5-medium (CLIP-L and CLIP-G with projections, T5,
        a transformer with qk norms, attn2 in its first blocks and a pre-only last block, a 16-channel VAE with shift
        and scale, the shift-3 scheduler) at toy sizes: 64 px by default; `wide`: three heads of 8 and two blocks
        without attn2 (as 3.5 Large)."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer, t5_tok = clip_tokenizer(folder / "_tok"), t5_tokenizer()
        heads, head_dim = (3, 8) if wide else (2, 16)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if wide else 3,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * TEXT_DIM,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16,
            dual_attention_layers=() if wide else (0, 1), qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
            force_upcast=False,
        )
        t5 = T5EncoderModel(T5Config(  # T5's width is the prompt's: the CLIP states (2 x 32) are padded to it
            vocab_size=len(t5_tok), d_model=2 * TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
            vae=vae, text_encoder=CLIPTextModelWithProjection(clip_text_config(len(tokenizer), True)),
            tokenizer=tokenizer, text_encoder_2=CLIPTextModelWithProjection(clip_text_config(len(tokenizer), True)),
            tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tok,
        )
        pipe.save_pretrained(folder)
        return folder


def adapted(attention: nn.Module) -> dict[str, str]:
    """An attention module's adapted projections (projection -> key): the image stream's, and the text stream's
    where it has one, but for a pre-only text stream's q (its text queries' outputs are discarded)."""
    found = dict(IMAGE)
    if getattr(attention, "add_k_proj", None) is not None:
        found |= {proj: key for proj, key in TEXT.items() if getattr(attention, proj, None) is not None}
        if getattr(attention, "context_pre_only", False):
            found.pop("add_q_proj", None)
    return found


def flow_matching_at_timesteps(latents: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, noise, timestep): t uniform over the scheduler's training timesteps (SD3's carry the shift), sigma its
    own sigma, noisy = (1 - sigma) x0 + sigma noise; noise, then timesteps, as flux.flow_matching_noisy draws them.
    Uniform where diffusers' SD3 script defaults to logit-normal weighting: the authors' FLUX code draws uniformly.
    Not flux's function itself: SD3's transformer takes the timestep (t / 1000 x 1000 can miss it by an ulp)."""
    noise = torch.randn_like(latents)
    index = torch.randint(0, len(scheduler.timesteps), (latents.shape[0],), device=latents.device)
    timestep = scheduler.timesteps.to(latents.device)[index].float()
    sigma = scheduler.sigmas.to(latents.device)[index].float()[:, None, None, None]
    return (1 - sigma) * latents + sigma * noise, noise, timestep
