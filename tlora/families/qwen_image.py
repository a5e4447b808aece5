"""Qwen-Image: a 20B MM-DiT (60 double-stream blocks, no single-stream ones), a Qwen2.5-VL text encoder, a video VAE
(AutoencoderKLQwenImage: latents with a frame dimension of 1, normalised per channel by the VAE config's
latents_mean / latents_std), flow matching with the timestep scaled to 0..1, true CFG (a negative prompt as a
second denoiser call).

Adapters go where the authors' FLUX T-LoRA puts them on an MM-DiT double block, with its keys: the image stream's
`to_q/k/v`, `to_out.0` (`<block>.attn.processor.to_{q,k,v,out}_lora`) and the text stream's `add_q/k/v_proj`
(`to_{q,k,v}_proj_lora`). The text stream's output projection `to_add_out` is left alone, as on FLUX.1 and
FLUX.2 (in Qwen-Image the last block's is unused besides: its text output is dropped). ComfyUI's Qwen-Image model
names its layers as diffusers does, so kohya files are `lora_unet_<module path with _>`, one layer per projection.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers.models import BPE
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tlora.families.base import Family
from tlora.families.flux import (
    DOUBLE,
    DOUBLE_PROJECTIONS,
    TEXT,
    double_block_layers,
    flow_matching_noisy,
    from_thousandths,
)
from tlora.families.tiny_parts import QWEN_CHAT, QWEN_SPECIAL, TEXT_DIM, qwen_tokenizer
from tlora.method.denoiser import Layer

# Keys that name a layer only Qwen-Image has: its MLP and modulation names (LyCORIS keys), or a block past the
# others' last (FLUX.1's and Chroma's 19 double blocks, klein's 5 or 8, SD3.5 Large's 38 joint blocks).
ONLY_QWEN = re.compile(r"transformer_blocks[._]\d+[._](img|txt)_(mlp|mod)|^(lycoris_)?transformer_blocks[._]"
                       r"(3[89]|[4-9]\d|\d{3,})[._]")
# QwenImagePipeline's scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json)
QWEN_FLOW = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
# The words of QwenImagePipeline.prompt_template_encode: whole tokens in Qwen2.5-VL's tokenizer, so that its system
# prefix is the 34 tokens the pipeline drops (prompt_template_encode_start_idx).
TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape",
                  "size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                  "background")


# the published model, for the estimator: Qwen/Qwen-Image's configs (keys left out take the classes' defaults,
# which are its values: the VAE's are all defaults; the text encoder is Qwen2.5-VL-7B-Instruct's)
PUBLISHED = {
    "qwen-image": {
        "transformer": ("diffusers", "QwenImageTransformer2DModel", dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56])),
        "vae": ("diffusers", "AutoencoderKLQwenImage", {}),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", dict(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                             max_position_embeddings=128000),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
            tie_word_embeddings=False)),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", QWEN_FLOW),
    },
}


class QwenImage(Family):
    name = "qwen_image"
    pipeline_class = QwenImagePipeline
    model_attr = "transformer"
    training_scheduler = FlowMatchEulerDiscreteScheduler  # with the model's config (a fixed shift in its timesteps)
    timestep_arg = ("timestep", 3)
    timestep_divisor = 1000
    timestep_cast = True  # `t.expand(b).to(latents.dtype)` before `timestep / 1000`
    default_vae = None
    train_defaults = {  # Vanilla T-LoRA with the mask; bf16 and AdamW as diffusers' Qwen-Image DreamBooth recipe
        "trainer_type": "lora", "trainer_class": "qwen_image_tlora", "lora_rank": 16, "min_rank": 8,
        "checkpointing_steps": 100, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 4, "placeholder_token": "sks", "max_sequence_length": 512,
    }
    resize_first = True  # diffusers' Qwen-Image DreamBooth data: Resize, then crop
    resolution_multiple = 16  # VAE factor 8 times the 2x2 latent packing
    inference_steps, inference_guidance = 50, 4.0  # QwenImagePipeline's num_inference_steps and true_cfg_scale
    guidance_arg = "true_cfg_scale"  # its guidance_scale is for guidance-distilled models only
    gpu_dtype = "bf16"  # Qwen-Image's weights; ComfyUI runs it in bf16 or fp32 only
    key_prefixes = ("transformer_blocks",)
    rank_rule = "multiply_first"  # the authors' FLUX (flow-matching MM-DiT) code
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default on Qwen-Image"
    layer_kinds = {"image": "image stream", "text": "text stream"}
    projections = DOUBLE_PROJECTIONS
    kohya_base_model = "qwen_image"
    pipelines = ("QwenImagePipeline",)
    architectures = PUBLISHED
    # the pipeline reads the prompt inside its own template (not the tokenizer's chat template): 5 tokens more
    tokenizers = [("tokenizer", "Qwen2.5-VL", "max_sequence_length", False)]

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, QwenImageTransformer2DModel)

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Every block's image q, k, v, out and text q, k, v, in module order (FLUX's order within a block)."""
        return [layer for name, _ in model.named_modules() if DOUBLE.match(name) for layer in double_block_layers(name)]

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        return ONLY_QWEN.search(key) is not None

    @classmethod
    def original_names(cls, modules: list[str]) -> dict[str, str]:
        """ComfyUI's Qwen-Image model names its layers as diffusers does (comfy/lora.py model_lora_keys_unet)."""
        return {module: module for module in modules}

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return "text" if prefix.rsplit(".", 1)[-1] in TEXT.values() else "image"

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline calls the transformer with t / 1000: back to t as on FLUX (rounded to 1/1000)."""
        return from_thousandths(timestep)

    @classmethod
    def call_kwargs(cls, hparams: dict) -> dict:
        """The prompt length as trained, and the model card's negative prompt " ", without which the pipeline
        runs no CFG (true_cfg_scale then weighs the second call)."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512, "negative_prompt": " "}

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        return [pipe.text_encoder, pipe.vae.encoder, pipe.vae.quant_conv]

    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int
                      ) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's last hidden states of the prompt in the pipeline's template (its own encode_prompt), padded
        with zeros to max_sequence_length so that prompts stack, and the mask of the real tokens."""
        embeds, _ = pipe.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
        length = embeds.shape[1]
        mask = torch.zeros(1, max_sequence_length, dtype=torch.long, device=embeds.device)
        mask[:, :length] = 1
        padded = embeds.new_zeros(1, max_sequence_length, embeds.shape[2])
        padded[:, :length] = embeds
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask}

    @classmethod
    def encode_pixels(cls, pipe, pixels: torch.Tensor, crop: int, resolution: int, device: torch.device
                      ) -> dict[str, torch.Tensor]:
        """The latent distribution of the image as a one-frame video, (1, z_dim, h, w) without the frame axis."""
        dist = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)[:, :, None]).latent_dist
        return {"mean": dist.mean[:, :, 0], "std": dist.std[:, :, 0]}

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length):
        """Latents of in_channels / 4 channels (read in 2x2 patches), the prompt padded to max_sequence_length."""
        c, side = model.config, resolution // 8
        latent = (1, c.in_channels // 4, side, side)
        return {"mean": latent, "std": latent, "prompt_embeds": (1, max_sequence_length, c.joint_attention_dim),
                "prompt_embeds_mask": (1, max_sequence_length)}

    @classmethod
    def predict(cls, model, pipe, scheduler, batch, dtype, guidance):
        """Flow matching as diffusers' Qwen-Image DreamBooth script: x0 = (sample - latents_mean) / latents_std (as
        QwenImageImg2ImgPipeline encodes; the pipelines' decode inverts it), noisy = (1 - sigma) x0 + sigma noise
        for t uniform over the scheduler's timesteps, sigma = t / 1000, target = noise - x0."""
        mean, config = batch["mean"], pipe.vae.config
        sample = mean + batch["std"] * torch.randn_like(mean)
        latents = (sample - per_channel(config.latents_mean, mean)) * (1.0 / per_channel(config.latents_std, mean))
        noisy, noise, sigma = flow_matching_noisy(latents, scheduler)
        b, c, h, w = latents.shape
        embeds, mask = prompt_as_called(batch["prompt_embeds"], batch["prompt_embeds_mask"])
        pred = model(
            hidden_states=QwenImagePipeline._pack_latents(noisy, b, c, h, w).to(dtype), timestep=sigma,
            encoder_hidden_states=embeds.to(dtype), encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False,
        )[0]
        scale = 2 ** len(config.temperal_downsample)
        return QwenImagePipeline._unpack_latents(pred, h * scale, w * scale, scale)[:, :, 0], noise - latents

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """The classes and wiring of Qwen/Qwen-Image (a Qwen2.5-VL text encoder with a byte-level BPE tokenizer
        that reads the pipeline's template as Qwen's does, the MM-DiT, the video VAE with per-channel latent
        statistics, its scheduler config) at toy sizes; `wide`: a wider text encoder, three heads of 8, three
        blocks."""
        folder = Path(folder)
        torch.manual_seed(seed)
        tokenizer = template_tokenizer()
        width = 48 if wide else TEXT_DIM
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=width // 16, num_key_value_heads=1,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                             bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                               fullatt_block_indexes=[0]),
        ))
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.8, 2.0, 1.2],
        )
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=3 if wide else 2,
            attention_head_dim=8 if wide else 16, num_attention_heads=3 if wide else 2, joint_attention_dim=width,
            axes_dims_rope=(2, 2, 4) if wide else (4, 6, 6),
        )
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_FLOW), vae=vae,
                                 text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
        pipe.save_pretrained(folder)
        return folder


def per_channel(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per latent channel, (1, channels, 1, 1), on `like`'s device and dtype."""
    return torch.tensor(values).view(1, -1, 1, 1).to(like)


def prompt_as_called(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cached prompts as QwenImagePipeline.encode_prompt gives them: cut to the longest, no mask when none is
    padded (the transformer then attends without one). On meta (the estimator) the values are unknown: the whole
    length, unmasked."""
    if mask.device.type == "meta":
        return embeds, None
    length = int(mask.sum(1).max())
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, None if mask.all() else mask


def template_tokenizer() -> Qwen2Tokenizer:
    """tiny_parts' Qwen tokenizer with merges that make each word of QwenImagePipeline's prompt template one token
    (alone and after a space), so that its system prefix is 34 tokens, as with Qwen2.5-VL's tokenizer."""
    model = json.loads(qwen_tokenizer().backend_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for word in (w for word in TEMPLATE_WORDS for w in (word, "\u0120" + word)):
        # the word's pieces under the merges so far, then joined left to right by merges ranked after them
        pieces = [t.value for t in BPE(vocab=vocab, merges=merges).tokenize(word)]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)})
    tokenizer.chat_template = QWEN_CHAT
    return tokenizer
