"""One tiny model of each family, with what the shared tests need to drive it: denoiser inputs, the timestep the
denoiser takes for a diffusion t, and the family's img2img pipeline. A new family adds one entry to CASES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from tlora import families

from helpers import (
    chroma_inputs,
    flux_inputs,
    klein_inputs,
    qwen_image_inputs,
    sd3_inputs,
    sd15_inputs,
    sdxl_inputs,
    wan_inputs,
    zimage_inputs,
)


@dataclass
class Spec:
    inputs: Callable  # denoiser, batch, seed -> keyword arguments but the timestep
    timestep: Callable  # diffusion t -> what the pipelines pass the denoiser
    img2img: str | None  # the family's diffusers img2img and inpainting pipeline classes (None: it has none)
    inpaint: str | None
    call_kwargs: dict = field(default_factory=dict)
    calls_per_step: int = 1  # denoiser calls per denoising step (2: guidance as a second call, not a bigger batch)
    per_prompt: str = "num_images_per_prompt"  # the pipeline call's count of outputs per prompt (video: videos)


CASES = {
    "sdxl": Spec(sdxl_inputs, lambda t: t, "StableDiffusionXLImg2ImgPipeline",
                 "StableDiffusionXLInpaintPipeline"),
    "flux": Spec(flux_inputs, lambda t: t / 1000, "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                 {"height": 64, "width": 64, "max_sequence_length": 16}),
    "klein": Spec(klein_inputs, lambda t: t / 1000, None, "Flux2KleinInpaintPipeline",
                  {"height": 64, "width": 64, "max_sequence_length": 16}, calls_per_step=2),
    # ChromaInpaintPipeline (diffusers 0.42.1, and main) reads transformer.config.guidance_embeds, which
    # ChromaTransformer2DModel has not: it fails on every Chroma model, so it is not run
    "chroma": Spec(chroma_inputs, lambda t: t / 1000, "ChromaImg2ImgPipeline", None,
                   {"height": 64, "width": 64, "max_sequence_length": 16}, calls_per_step=2),
    "sd15": Spec(sd15_inputs, lambda t: t, "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "wan": Spec(wan_inputs, lambda t: t, None, None, {"height": 32, "width": 32, "num_frames": 5,
                                                      "max_sequence_length": 16}, calls_per_step=2,
                per_prompt="num_videos_per_prompt"),
    "sd3": Spec(sd3_inputs, lambda t: t, "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
                {"height": 64, "width": 64, "max_sequence_length": 16}),
    # the transformer gets (1000 - t) / 1000; CFG is a doubled batch in one call
    "zimage": Spec(zimage_inputs, lambda t: (1000 - t) / 1000, "ZImageImg2ImgPipeline", "ZImageInpaintPipeline",
                   {"height": 64, "width": 64, "max_sequence_length": 32}),
    # true CFG: the negative prompt is a second call
    "qwen_image": Spec(qwen_image_inputs, lambda t: t / 1000, "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                       {"height": 64, "width": 64, "max_sequence_length": 16, "negative_prompt": " "},
                       calls_per_step=2),
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
            out = self.model(**{self.family.timestep_arg[0]: self.spec.timestep(t)}, return_dict=False, **inputs)[0]
            return torch.stack(out) if isinstance(out, list) else out  # Z-Image: one tensor per sample

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
    """The family's case, on its session-wide tiny pipeline (the conftest fixture <name>_pipe)."""
    return Case(name, request.getfixturevalue(f"{name}_pipe"), CASES[name])
