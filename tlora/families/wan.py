"""Wan 2.1 text-to-video (1.3B, 14B) and Wan 2.2 A14B: a DiT with self- and cross-attention in every block, a UMT5
text encoder, a causal 3-D VAE with per-channel latent statistics, flow matching with the scheduler's t passed as it is.

Adapters go on every block's self-attention (`attn1`) and cross-attention (`attn2`) projections: `to_q`, `to_k`,
`to_v`, `to_out.0`, with the keys `blocks.<i>.attn<1|2>.processor.to_{q,k,v,out}_lora` (as on the other families).
A T-LoRA trains on photos and clips: a photo is a one-frame video, (b, 3, 1, H, W) into the VAE, one latent frame out;
a clip in the data folder (a video file, a GIF, an animated WebP) trains on its first N = 4k + 1 frames (at most
CLIP_FRAMES), (b, 3, N, H, W) into the VAE, (N - 1) / 4 + 1 latent frames out.

Timestep: WanPipeline calls the transformer with `t.expand(batch)` of its scheduler's timesteps (UniPC with flow
sigmas: int64 `sigma * 1000`, 1000 = pure noise), so the denoiser's timestep is the paper's t itself.
Exports: kohya keys are ComfyUI's names for WAN21 (comfy/ldm/wan/model.py: `blocks.<i>.self_attn.{q,k,v,o}`,
`cross_attn.{q,k,v,o}`), one per projection, which diffusers' WanLoraLoaderMixin reads too (musubi-tuner's layout).

Wan 2.2 A14B (WanPipeline with `transformer_2` and `boundary_ratio`): two experts of Wan 2.1 14B's architecture;
WanPipeline runs `transformer` (high noise) at t >= boundary_ratio * 1000 and `transformer_2` (low noise) below, each
called with the scheduler's t as 2.1's transformer is. Both are adapted in one T-LoRA whose root is WanExperts (the
two as children, made once per pipeline): keys `transformer.blocks.<i>...` and `transformer_2.blocks.<i>...`, each
expert's mask r(t) of the same paper t (DenoiserSpec.entries). Training sends each sample to the expert WanPipeline
uses at its t. Exports are a file per expert (`_high_noise`, `_low_noise`), as ComfyUI loads the experts as two
WAN21 models and diffusers' WanLoraLoaderMixin loads the second with `load_into_transformer_2=True`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from tlora.common.errors import CheckpointError, UsageError
from tlora.families.base import Family
from tlora.families.flux import flow_matching_noisy
from tlora.families.tiny_parts import TEXT_DIM, t5_tokenizer
from tlora.method.denoiser import DenoiserSpec, Layer

ATTENTION = re.compile(r"^blocks\.\d+\.attn[12]$")
PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
# diffusers' names -> ComfyUI's WanModel names (comfy/ldm/wan/model.py WanAttentionBlock, WanSelfAttention)
COMFY_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
COMFY_PROJECTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
MODULE = re.compile(r"^blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")
VAE_SPATIAL = 8  # AutoencoderKLWan's scale_factor_spatial (Wan 2.1): pixels per latent side
VAE_TEMPORAL = 4  # its scale_factor_temporal: a video of 4k + 1 frames is k + 1 latent frames
# the most frames of a clip that train: 17, about a second at 16 fps: 5 latent frames, 5 times a photo's tokens (the
# first 4k + 1 frames of a clip train, up to this)
CLIP_FRAMES = 17
FPS = 16  # Wan 2.1's frame rate (diffusers' WanPipeline example exports at 16)
EXPERTS = ("transformer", "transformer_2")  # Wan 2.2 A14B's high- and low-noise experts (WanPipeline's attributes)
EXPERT_FILES = {"_high_noise": "transformer.", "_low_noise": "transformer_2."}  # export file suffix -> its keys
A14B_BOUNDARY = 0.875  # Wan-AI/Wan2.2-T2V-A14B-Diffusers' boundary_ratio (the estimator's bare parts have no config)

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
# Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of the 14B's architecture (transformer: high noise, transformer_2:
# low noise), Wan 2.1's VAE and UMT5; boundary_ratio 0.875 is the pipeline's config, not a part the estimate builds
PUBLISHED["wan2.2-t2v-a14b"] = {**PUBLISHED["wan2.1-t2v-14b"],
                                "transformer_2": PUBLISHED["wan2.1-t2v-14b"]["transformer"]}


class WanExperts(nn.Module):
    """Wan 2.2 A14B's two experts as one denoiser, the T-LoRA's root (the experts are its children, not copies).
    Called as a transformer (training), each sample goes to the expert WanPipeline uses at its t: `transformer` at
    t >= boundary, else `transformer_2`; on `meta` (the estimator: no values) the whole batch goes to `transformer`."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary: float) -> None:
        super().__init__()
        self.transformer, self.transformer_2, self.boundary = transformer, transformer_2, boundary

    @property
    def config(self):
        """The experts' shared configuration (conditioning shapes)."""
        return self.transformer.config

    def enable_gradient_checkpointing(self, *args) -> None:
        for name in EXPERTS:
            getattr(self, name).enable_gradient_checkpointing(*args)

    def disable_gradient_checkpointing(self) -> None:
        for name in EXPERTS:
            getattr(self, name).disable_gradient_checkpointing()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **kwargs):
        flat = timestep.reshape(-1)
        high = None if flat.is_meta else flat >= self.boundary  # (on meta: no values to route by)
        count = len(flat) if high is None else int(high.sum())  # one host sync a step
        if count in (0, len(flat)):  # the whole batch on one expert
            expert = self.transformer if count else self.transformer_2
            out = expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                         return_dict=False, **kwargs)[0]
        else:  # samples on both sides: each expert on its own rows, put back in order
            rows = [high.nonzero()[:, 0], (~high).nonzero()[:, 0]]
            preds = [getattr(self, name)(hidden_states=hidden_states[r], timestep=timestep[r],
                                         encoder_hidden_states=encoder_hidden_states[r], return_dict=False,
                                         **kwargs)[0] for name, r in zip(EXPERTS, rows)]
            out = torch.cat(preds)[torch.cat(rows).argsort()]
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def experts(pipe) -> WanExperts:
    """A Wan 2.2 pipeline's experts as one denoiser, made once and kept on the pipeline (in a tuple: no component,
    and no module the estimator's scan of the pipeline's parts would count again) so that tlora.attach, load,
    set_scale and unload all find the same root; made again if the pipeline's experts were replaced."""
    held = getattr(pipe, "_tlora_experts", ())
    parts = [getattr(getattr(pipe, name), "_orig_mod", getattr(pipe, name)) for name in EXPERTS]
    if held and all(getattr(held[0], name) is part for name, part in zip(EXPERTS, parts)):
        return held[0]
    config = getattr(pipe, "config", None)
    ratio = config.get("boundary_ratio") if config is not None else A14B_BOUNDARY
    # as WanPipeline: without boundary_ratio, `transformer` runs at every step (transformer_2 never does)
    boundary = float("-inf") if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
    made = WanExperts(*parts, boundary)
    pipe._tlora_experts = (made,)
    return made


class Wan(Family):
    name = "wan"
    pipeline_class = WanPipeline
    model_attr = "transformer"
    timestep_arg = ("timestep", 1)
    timestep_divisor = 1  # WanPipeline passes the scheduler's t (0..1000) as it is
    default_vae = None
    # public Wan LoRA recipes (musubi-tuner, DiffSynth-Studio): rank 32, AdamW at 1e-4, bf16, gradient norm 1.0;
    # the T-LoRA's r_min at half the rank; the UMT5 prompt length Wan was trained with (text_len 512); Wan 2.1 1.3B's
    # native 480p (832x480: a 480-px square trains); validation videos of one frame (the pipeline's 81 frames at every
    # checkpoint would take longer than the training between them: --validation_num_frames 81 asks for them)
    train_defaults = {
        "trainer_type": "ortho_lora", "trainer_class": "wan_tlora", "lora_rank": 32, "min_rank": 16,
        "checkpointing_steps": 100, "optimizer": "adamw", "max_grad_norm": 1.0, "mixed_precision": "bf16",
        "num_val_imgs_per_prompt": 1, "placeholder_token": "sks", "max_sequence_length": 512,
        "resolution": 480, "validation_num_frames": 1,
    }
    resize_first = True  # as diffusers' training scripts: resize, then crop
    resolution_multiple = 16  # the VAE's 8 times the transformer's 2x2 patches (WanPipeline.check_inputs)
    inference_steps, inference_guidance = 50, 5.0  # WanPipeline.__call__'s defaults
    gpu_dtype = "bf16"  # as Wan's own code and diffusers' Wan examples run the transformer
    frames_multiple = VAE_TEMPORAL  # a video's frames are 4k + 1 (the VAE's scale_factor_temporal; WanPipeline rounds)
    clip_frames = CLIP_FRAMES  # clips in the data folder train on their first 4k + 1 frames, at most this many
    key_prefixes = ("blocks", *(f"{name}.blocks" for name in EXPERTS))
    rank_rule = "multiply_first"
    masked_by_default, masked_by_default_why = True, "the T-LoRA mask: tlora's default (no authors' Wan runs)"
    layer_kinds = {"self": "self-attention", "cross": "cross-attention"}
    projections = {key: proj for proj, key in PROJECTIONS.items()}
    kohya_base_model = "wan"
    pipelines = ("WanPipeline",)
    architectures = PUBLISHED
    tokenizers = [("tokenizer", "UMT5", "max_sequence_length", False)]

    @classmethod
    def model(cls, pipe_or_model):
        """The transformer; a Wan 2.2 pipeline's two experts as one (WanExperts, the same object each time)."""
        model = getattr(pipe_or_model, "_orig_mod", pipe_or_model)
        if isinstance(model, WanExperts):
            return model
        if all(getattr(pipe_or_model, name, None) is not None for name in EXPERTS):
            return experts(pipe_or_model)
        return super().model(pipe_or_model)

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, (WanTransformer3DModel, WanExperts))

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Each block's attn1 then attn2: q, k, v, out, in module order; Wan 2.2: `transformer`'s, then
        `transformer_2`'s, their keys and paths under the expert's name."""
        if isinstance(model, WanExperts):
            return [Layer(f"{name}.{layer.prefix}", f"{name}.{layer.path}")
                    for name in EXPERTS for layer in cls.layers(getattr(model, name))]
        return [Layer(f"{name}.processor.{key}", f"{name}.{proj}")
                for name, _ in model.named_modules() if ATTENTION.match(name) for proj, key in PROJECTIONS.items()]

    @classmethod
    def describe(cls, model: nn.Module) -> DenoiserSpec:
        """Wan 2.2: the timestep comes with each expert's own call (the pipeline calls them, not WanExperts)."""
        spec = super().describe(model)
        return replace(spec, entries=EXPERTS) if isinstance(model, WanExperts) else spec

    @classmethod
    def export_files(cls, names: list[str]) -> dict[str, str]:
        """Wan 2.2: a file per expert, keyed as one Wan 2.1 transformer's (ComfyUI and diffusers load them so)."""
        return EXPERT_FILES if any(n.startswith(tuple(EXPERT_FILES.values())) for n in names) else {"": ""}

    @classmethod
    def check_fits(cls, model: nn.Module, keys: list[str], where: str) -> None:
        """A Wan 2.2 T-LoRA (keys under transformer. and transformer_2.) on Wan 2.1, or the other way round."""
        two_keys = any(k.startswith(tuple(EXPERT_FILES.values())) for k in keys)
        if two_keys and not isinstance(model, WanExperts):
            raise CheckpointError(f"{where} is a Wan 2.2 A14B T-LoRA (its keys name both experts, transformer and "
                                  "transformer_2); this is one Wan transformer (Wan 2.1, or one expert alone): load it "
                                  "on the Wan 2.2 pipeline it was trained on")
        if isinstance(model, WanExperts) and keys and not two_keys:
            raise CheckpointError(f"{where} is a Wan 2.1 T-LoRA (one transformer); this is a Wan 2.2 A14B pipeline "
                                  "with two experts (transformer and transformer_2): load it on a Wan 2.1 pipeline, or "
                                  "on pipe.transformer alone")

    @classmethod
    def original_names(cls, modules: list[str]) -> dict[str, str]:
        """ComfyUI's WAN21 layer names (comfy/ldm/wan/model.py): `blocks.0.self_attn.q`."""
        out = {}
        for module in modules:
            block, attention, proj = MODULE.match(module).groups()
            out[module] = f"blocks.{block}.{COMFY_ATTENTION[attention]}.{COMFY_PROJECTION[proj]}"
        return out

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        return "self" if ".attn1." in prefix else "cross"

    @classmethod
    def call_kwargs(cls, hparams: dict) -> dict:
        """The prompt length as trained (size and frames are the pipeline's defaults unless asked for)."""
        return {"max_sequence_length": hparams.get("max_sequence_length") or 512}

    @classmethod
    def load_pipeline(cls, model: str, vae: str | None, revision: str | None, dtype: torch.dtype,
                      quantization=None):
        """Wan 2.2 A14B with a quantized base (--base_model_precision): both experts quantized, as the estimate counts
        them (the mapping that pipelines.quantization makes names the denoiser attribute, `transformer`, only)."""
        mapping = getattr(quantization, "quant_mapping", None)
        if mapping and cls.model_attr in mapping:
            from tlora.families import model_index

            if model_index(model, revision).get("transformer_2", [None])[0] is not None:
                mapping.setdefault("transformer_2", mapping[cls.model_attr])
        return super().load_pipeline(model, vae, revision, dtype, quantization)

    @classmethod
    def prepare(cls, pipe, dtype: torch.dtype) -> None:
        """Wan 2.1's and Wan 2.2 A14B's text-to-video pipelines (not Wan 2.2 TI2V-5B's per-token timesteps); the
        VAE in float32 under half precision, as diffusers' Wan examples load it."""
        if dict(getattr(pipe, "config", {})).get("expand_timesteps") or getattr(pipe, "transformer", None) is None:
            name = getattr(pipe, "name_or_path", None) or "the model"
            raise UsageError(f"--pretrained_model_name_or_path: {name} is a Wan 2.2 model with per-token timesteps "
                             "(TI2V-5B) or without its high-noise transformer, which tlora does not train; pass a Wan "
                             "2.1 or Wan 2.2 A14B text-to-video model such as Wan-AI/Wan2.2-T2V-A14B-Diffusers")
        if dtype in (torch.float16, torch.bfloat16):
            pipe.vae.float()  # (not .to(dtype): diffusers warns on every such cast)
        for name in EXPERTS:
            transformer = getattr(pipe, name, None)
            if transformer is not None and next(transformer.parameters()).is_meta:  # built empty (the estimator):
                transformer.rope.to("meta")  # its rotary tables, made at init outside init_empty_weights, go to meta

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
        """A photo (b, 3, H, W) as a one-frame video (b, 3, 1, H, W), or a clip (b, 3, N, H, W) of N = 4k + 1 frames:
        the latent distribution (b, 16, (N - 1) / 4 + 1, H/8, W/8)."""
        return super().encode_pixels(pipe, pixels if pixels.dim() == 5 else pixels[:, :, None], crop, resolution,
                                     device)

    @classmethod
    def conditioning_shapes(cls, model, resolution, max_sequence_length, frames: int = 1):
        """A photo's (`frames`: a clip's of 4k + 1 frames) and a prompt's tensors."""
        c, side = model.config, resolution // VAE_SPATIAL
        latent = (1, c.in_channels, (frames - 1) // VAE_TEMPORAL + 1, side, side)
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
        calls it. Returned with channels and frames flattened, (b, c * f, h, w), for any number f of latent frames (a
        photo's 1, a clip's (N - 1) / 4 + 1): the loss masks, (b, 1, h, w), broadcast over c * f."""
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
        return tiny_pipeline(folder, seed, wide)


def tiny_wan22(folder: str | Path, seed: int = 0) -> Path:
    """The tiny Wan as Wan-AI/Wan2.2-T2V-A14B-Diffusers wires it: a second expert (transformer_2, other weights) and
    boundary_ratio 0.875."""
    return tiny_pipeline(folder, seed, experts=True)


def tiny_pipeline(folder: str | Path, seed: int = 0, wide: bool = False, experts: bool = False) -> Path:
    """Wan.tiny_model (experts: tiny_wan22), written to `folder`."""
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
    transformers = [WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3 if wide else 2, attention_head_dim=8 if wide else 16,
        in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48 if wide else 32,
        num_layers=3 if wide else 2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ) for _ in EXPERTS[:2 if experts else 1]]
    two = {"transformer_2": transformers[1], "boundary_ratio": A14B_BOUNDARY} if experts else {}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformers[0],
                       scheduler=UniPCMultistepScheduler(**UNIPC_FLOW), **two)
    pipe.save_pretrained(folder)
    return folder
