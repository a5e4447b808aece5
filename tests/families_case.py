"""One tiny model of each family, with what the shared tests need to drive it: denoiser inputs, the timestep the
denoiser takes for a diffusion t, and the family's img2img pipeline. A new family adds one entry to CASES."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from tlora import families


def sdxl_inputs(unet, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, cross = unet.config.sample_size, unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {"sample": torch.randn(batch, 4, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}}


def flux_inputs(transformer, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g), "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(5, 3), "guidance": torch.ones(batch)}


def klein_inputs(transformer, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, transformer.config.joint_attention_dim, generator=g),
            "img_ids": ids.expand(batch, -1, -1), "txt_ids": text_ids.expand(batch, -1, -1)}


@dataclass
class Spec:
    fixture: str  # the session fixture with the family's tiny pipeline (conftest)
    inputs: Callable  # denoiser, batch, seed -> keyword arguments but the timestep
    timestep: Callable  # diffusion t -> what the pipelines pass the denoiser
    img2img: str | None  # the family's diffusers img2img and inpainting pipeline classes (None: it has none)
    inpaint: str
    call_kwargs: dict = field(default_factory=dict)
    calls_per_step: int = 1  # denoiser calls per denoising step (2: guidance as a second call, not a bigger batch)


CASES = {
    "sdxl": Spec("tiny_pipe", sdxl_inputs, lambda t: t, "StableDiffusionXLImg2ImgPipeline",
                 "StableDiffusionXLInpaintPipeline"),
    "flux": Spec("flux_pipe", flux_inputs, lambda t: t / 1000, "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                 {"height": 64, "width": 64, "max_sequence_length": 16}),
    "klein": Spec("klein_pipe", klein_inputs, lambda t: t / 1000, None, "Flux2KleinInpaintPipeline",
                  {"height": 64, "width": 64, "max_sequence_length": 16}, calls_per_step=2),
}


@dataclass
class Case:
    name: str
    pipe: Any
    spec: Spec

    @property
    def family(self):
        return families.get(self.name)

    @property
    def model(self):
        return families.denoiser(self.pipe)

    @property
    def call_kwargs(self) -> dict:
        return self.spec.call_kwargs

    def output(self, t: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The denoiser's output for one sample per diffusion timestep in `t` (the same inputs for a seed)."""
        with torch.no_grad():
            inputs = self.spec.inputs(self.model, len(t), seed)
            return self.model(timestep=self.spec.timestep(t), return_dict=False, **inputs)[0]

    def variant(self, kind: str):
        """The family's img2img or inpaint pipeline on the same components (so the same, hooked denoiser)."""
        import diffusers

        pipe = getattr(diffusers, getattr(self.spec, kind))(**self.pipe.components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image_kwargs(self, mask: bool = False) -> dict:
        image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
        extra = {"mask_image": Image.new("L", (64, 64), 255)} if mask else {}
        return {"image": image, "strength": 0.5, **extra}


def case_of(name: str, request) -> Case:
    spec = CASES[name]
    return Case(name, request.getfixturevalue(spec.fixture), spec)
