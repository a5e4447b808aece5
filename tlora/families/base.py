"""What differs between model families, in one place: a `Family` names it, one small module per family.

Everything else (adapters, injection, checkpoints, run folders, options, tracking, the loop, generation,
evaluation) is shared and asks the family for these. A new family is one module with one subclass and
an entry in `families.FAMILIES`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tlora.common.hub import model_load_error
from tlora.common.mapped import FilePages
from tlora.method.denoiser import DenoiserSpec, Layer, projections_fused
from tlora.method.injection import attach


class Target(NamedTuple):
    """One layer of an exported LoRA file: its name there (a module path, or a kohya key), its number of outputs,
    and where the T-LoRA's projections sit in it (module path -> first output row). Several projections make one
    target where the file's model fuses them (BFL's qkv and linear1, FLUX.2's to_qkv_mlp_proj). The family names
    its models' layers (original_layers, diffusers_layers); a format (tlora.formats) names them in its files."""

    name: str
    out_features: int
    parts: dict[str, int]


class Family:
    """One model family: its pipeline, adapted layers and keys, encodings, loss target, timestep scale."""

    name: str = ""
    pipeline_class: type = object
    model_attr: str = ""  # the denoiser's attribute on the pipeline: "unet" or "transformer"
    training_scheduler: Any = None  # the scheduler class training draws noise and timesteps with (model's config)
    timestep_arg: tuple[str, int] = ("timestep", 1)  # the denoiser's timestep argument: keyword, position
    timestep_divisor: int = 1  # the pipelines call the denoiser with the scheduler's timestep / this (FLUX: 1000)
    timestep_cast: bool = False  # its pipelines cast the scheduler's timestep to the latents' dtype first (FLUX)
    default_vae: str | None = None  # the VAE a run uses unless told otherwise (None: the model's own)
    train_defaults: dict[str, Any] = {}  # train.py defaults that differ between families
    resolution_multiple: int = 8  # training images' side must be a multiple of this
    resize_first: bool = False  # image preprocessing: resize then crop (else crop then resize); see data._square
    inference_steps: int = 25
    inference_guidance: float = 5.0
    guidance_arg: str = "guidance_scale"  # the pipeline call's argument for the CFG weight that --guidance_scale sets
    # a step-distilled published model: (its name, steps, guidance), said in one note when sampling at the defaults
    distilled_sampling: tuple[str, int, float] | None = None
    gpu_dtype: str = "fp16"  # inference.py's dtype on CUDA
    # -- reading T-LoRAs of this family ---------------------------------------------------------
    key_prefixes: tuple[str, ...] = ()  # first word of its checkpoint keys (also LyCORIS's, "." -> "_")
    rank_rule: str = "divide_first"  # how its authors round r(t) (adapters.RANK_RULES)
    masked_by_default: bool = True  # the authors' default when nothing records the trainer_class
    masked_by_default_why: str = ""
    layer_kinds: dict[str, str] = {}  # kind of adapted layer -> label (analyze's plots)
    projections: dict[str, str] = {}  # the authors' adapter key -> the projection it adapts (to_q_lora -> to_q)
    kohya_base_model: str = ""  # ss_base_model_version of its kohya-style files
    # -- what the rest of tlora finds here (a new family fills these in and is listed in families.FAMILIES) --------
    pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s of its models (how a model folder is detected)
    architectures: dict[str, dict[str, Any]] = {}  # published models for the estimator: name -> {component:
    #                                                (library, class, config)}
    # the prompt's tokenizers, as its pipelines tokenize: (subfolder, the text encoder it feeds, how many tokens it
    # reads: None is the tokenizer's own model_max_length, "max_sequence_length" the pipeline call's; whether the
    # prompt goes in the chat template)
    tokenizers: list[tuple[str, str, str | None, bool]] = []
    fit_by_quantizing: bool = True  # whether the estimator's --fit may suggest a 4-bit base model

    # -- the denoiser and its adapted layers ------------------------------------------------------
    @classmethod
    def model(cls, pipe_or_model: Any) -> nn.Module:
        """The denoiser of a pipeline (or the denoiser itself); a torch.compile wrapper is looked through."""
        model = getattr(pipe_or_model, cls.model_attr, pipe_or_model)
        return getattr(model, "_orig_mod", model)

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        """Whether `model` is this family's denoiser."""
        raise NotImplementedError

    @classmethod
    def layers(cls, model: nn.Module) -> list[Layer]:
        """Every adapter (Layer), in the authors' creation order."""
        raise NotImplementedError

    @classmethod
    def fused(cls, attention: nn.Module) -> bool:
        """Whether an attention module computes q, k, v through a fused layer (diffusers'
        fuse_qkv_projections), bypassing the separate projections that the adapters are hooked on."""
        return projections_fused(attention)

    @classmethod
    def describe(cls, model: nn.Module) -> DenoiserSpec:
        """This family's denoiser `model` as the method is told about it."""
        return DenoiserSpec(tuple(cls.layers(model)), cls.timestep_arg, cls.diffusion_t, cls.fused)

    @classmethod
    def attach(cls, pipe_or_model: Any, settings, init: bool = True, svd_device: torch.device | str | None = None):
        """A fresh T-LoRA on this family's denoiser (of a pipeline, or the denoiser itself): method.injection.attach
        told which layers and how the timestep maps to t."""
        model = cls.model(pipe_or_model)
        return attach(model, settings.for_family(cls.name, cls.rank_rule), cls.describe(model), init, svd_device)

    # -- sampling, checkpoint keys and the layers of its models (what tlora.formats name in their files) ---------
    @classmethod
    def call_kwargs(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Pipeline-call arguments that sampling adds for a run of this family (beyond steps and guidance)."""
        return {}

    @classmethod
    def module_path(cls, prefix: str) -> str:
        """The adapted Linear's path in the denoiser for a checkpoint key prefix (`<attention>.processor.<key>`)."""
        attention, _, key = prefix.rpartition(".processor.")
        return f"{attention}.{cls.projections[key]}"

    @classmethod
    def original_names(cls, modules: list[str]) -> dict[str, str]:
        """Module path -> the layer's path in the model's original checkpoint (the names ComfyUI, Forge and kohya
        know), for the families whose original layers are one per projection (SDXL's SGM UNet)."""
        raise NotImplementedError

    @classmethod
    def original_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """The layers of the model's original checkpoint that hold the projections in `widths` (module path ->
        number of outputs), named by their dotted paths there, with each projection's first row in a layer that
        fuses several (BFL's qkv, linear1); `meta` is the checkpoint's metadata. By default one per projection,
        named by original_names."""
        names = cls.original_names(list(widths))
        return [Target(names[m], width, {m: 0}) for m, width in widths.items()]

    @classmethod
    def diffusers_layers(cls, widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
        """The layers of the diffusers denoiser that hold the projections in `widths`: by default each projection
        itself (FLUX.2 fuses its single blocks' q, k, v)."""
        return [Target(m, width, {m: 0}) for m, width in widths.items()]

    @classmethod
    def export_files(cls, names: list[str]) -> dict[str, str]:
        """The files of a `diffusers` or `kohya` export (and of each diffusers-scheduled chunk) for a checkpoint's
        layers (module paths or key prefixes): file-name suffix -> the path prefix of the layers it holds, cut off in
        it. One file by default; a denoiser of models that load LoRAs one by one (Wan 2.2's experts) has one each."""
        return {"": ""}

    @classmethod
    def check_fits(cls, model: nn.Module, keys: list[str], where: str) -> None:
        """Refuse (CheckpointError, one line starting with `where`) a checkpoint with these keys that does not fit
        `model`, where the family can say more than its first key that does not; by default nothing to say."""

    @classmethod
    def model_metadata(cls, model: nn.Module) -> dict[str, str]:
        """What a checkpoint records about the model beyond its adapters (for exports)."""
        return {}

    @classmethod
    def owns_key(cls, key: str) -> bool:
        """Whether a checkpoint key (ours, the authors' or LyCORIS's) may name a layer of this family's denoiser."""
        return key.removeprefix("lycoris_").startswith(cls.key_prefixes)

    @classmethod
    def distinct_key(cls, key: str) -> bool:
        """Whether a key names a layer that only this family's denoiser has (FLUX.1 and FLUX.2 share the rest)."""
        return False

    @classmethod
    def layer_kind(cls, prefix: str) -> str:
        """The kind (a key of layer_kinds) of the layer an adapter key prefix names."""
        raise NotImplementedError

    @classmethod
    def diffusion_t(cls, timestep: torch.Tensor) -> torch.Tensor:
        """T-LoRA's t (0..num_train_timesteps) from the timestep the denoiser is called with."""
        return timestep

    @classmethod
    def scheduler_t(cls, timestep: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """T-LoRA's t at a scheduler timestep, from the value the family's pipelines pass the denoiser computed as
        they compute it: in the latents' `dtype` where they cast it (timestep_cast: bf16 moves t by a few)."""
        t = torch.as_tensor(timestep, dtype=torch.float32)
        t = t.to(dtype) if cls.timestep_cast else t
        return cls.diffusion_t(t / cls.timestep_divisor if cls.timestep_divisor != 1 else t)

    @classmethod
    def tiny_model(cls, folder: str | Path, seed: int = 0, wide: bool = False) -> Path:
        """Write a tiny random model of this family (its published classes and wiring at toy sizes) to `folder`,
        loadable by its pipeline's from_pretrained; `wide`: other widths and head counts (the tests' second build)."""
        raise NotImplementedError

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load_pipeline(cls, model: str, vae: str | None, revision: str | None, dtype: torch.dtype,
                      quantization: Any = None):
        """The pipeline in `dtype`, frozen, with the family's inference scheduler; load errors are one line."""
        # Half precision: loaded as stored (a float32 model's tensors are the checkpoint's memory-mapped pages),
        # then cast tensor by tensor, giving each one's pages back; loading straight in half precision holds the
        # whole mapped file beside the cast copies (SDXL: more host memory than a float32 load).
        cast_after = dtype in (torch.float16, torch.bfloat16) and quantization is None
        load_dtype = torch.float32 if cast_after else dtype
        kwargs: dict[str, Any] = {"revision": revision, "dtype": load_dtype}
        custom_vae = load_vae(vae, load_dtype)
        if custom_vae is not None:
            kwargs["vae"] = custom_vae
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        try:
            pipe = cls.pipeline_class.from_pretrained(model, **kwargs)
        except OSError as err:
            raise model_load_error("--pretrained_model_name_or_path", model, err) from None
        if cast_after:
            pages = FilePages()
            for part in pipe.components.values():
                if isinstance(part, nn.Module):
                    cast_as_loaded(part, dtype, pages)
        cls.prepare(pipe, dtype)
        for part in pipe.components.values():
            if isinstance(part, nn.Module):
                part.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def prepare(cls, pipe, dtype: torch.dtype) -> None:
        """Family-specific touches after loading (scheduler choice, VAE precision)."""

    @classmethod
    def noise_scheduler(cls, pipe):
        """The scheduler train.py adds noise with: training_scheduler from the model's own scheduler config."""
        return cls.training_scheduler.from_config(pipe.scheduler.config)

    @classmethod
    def encoders(cls, pipe) -> list[nn.Module | None]:
        """Parts only needed to encode prompts and images (moved off the GPU once all is cached); by default two
        text encoders and the VAE's encoder (None: a part this model lacks)."""
        return [pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder, pipe.vae.quant_conv]

    # -- conditioning and loss -----------------------------------------------------------------
    @classmethod
    def encode_prompt(cls, pipe, prompt: str, device: torch.device, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Prompt tensors with a leading batch dimension of 1."""
        raise NotImplementedError

    @classmethod
    def encode_pixels(cls, pipe, pixels: torch.Tensor, crop: int, resolution: int, device: torch.device
                      ) -> dict[str, torch.Tensor]:
        """Image tensors with a leading batch dimension of 1: the latent distribution (mean, std) and more."""
        dist = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist
        return {"mean": dist.mean, "std": dist.std}

    @classmethod
    def conditioning_shapes(cls, model: nn.Module, resolution: int, max_sequence_length: int
                            ) -> dict[str, tuple[int, ...]]:
        """The shapes of one cached image's and prompt's tensors (encode_pixels | encode_prompt), from the
        denoiser's config alone (the estimator traces the step without the encoders)."""
        raise NotImplementedError

    @classmethod
    def predict(cls, model: nn.Module, pipe, scheduler, batch: dict[str, torch.Tensor], dtype: torch.dtype,
                guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) in latent layout for fresh noise and timesteps. Random numbers are drawn in
        the authors' order: latent sample, noise, timesteps."""
        raise NotImplementedError

    # -- generation ----------------------------------------------------------------------------
    @classmethod
    def samples_name(cls, steps: int, guidance: float) -> str:
        """The authors' folder name for one sampling setting."""
        return f"ns{steps}_gs{guidance}"

    @classmethod
    def samples_folder(cls, checkpoint: Path, steps: int, guidance: float, version: int) -> Path:
        return Path(checkpoint) / "samples" / cls.samples_name(steps, guidance) / f"version_{version}"


@torch.no_grad()
def cast_as_loaded(model: nn.Module, dtype: torch.dtype, pages: FilePages | None = None) -> None:
    """Cast a model's floating parameters and saved buffers to `dtype` in place, one tensor at a time, except those
    its library keeps in float32 when loading in `dtype` (`_keep_in_fp32_modules`: diffusers always, transformers
    for float16; `_keep_in_fp32_modules_strict`); buffers not saved in checkpoints keep their dtype, as when
    loading. The result equals `from_pretrained(..., dtype=dtype)` bit for bit. With `pages`, each tensor's old
    pages of a memory-mapped checkpoint go back to the kernel once it is cast."""
    from diffusers import ModelMixin

    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16 or isinstance(model, ModelMixin):
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    saved = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and name in saved and not any(k in name.split(".") for k in keep):
            old = tensor.data
            tensor.data = old.to(dtype)
            if pages is not None and old.dtype != dtype:
                pages.drop(old)


def load_vae(name: str | None, dtype: torch.dtype):
    """The VAE named by --pretrained_vae_model_name_or_path; None for 'none' (the model's own)."""
    from diffusers import AutoencoderKL

    if not name or name.lower() == "none":
        return None
    try:
        return AutoencoderKL.from_pretrained(name, dtype=dtype)
    except OSError as err:  # not found, no network, no access: the user's input, not a bug
        raise model_load_error("--pretrained_vae_model_name_or_path", name, err) from None


@contextmanager
def moved(parts: list[nn.Module], device: torch.device):
    """Bring `parts` to `device` for a while, then back where they were."""
    parts = [p for p in parts if p is not None]
    before = [next(p.parameters()).device for p in parts]
    for part in parts:
        part.to(device)
    try:
        yield
    finally:
        for part, where in zip(parts, before):
            part.to(where)
