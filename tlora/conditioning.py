"""What the UNet is conditioned on during training: image latents, prompt embeddings, SDXL time ids.

With `cache=True` (the default) each training image's latent distribution (mean, std) and each prompt's
embeddings are computed once; every step then samples latents from the cached distribution, as a fresh
VAE encode would. With `cache=False` every step reloads, re-crops and re-encodes the image and the prompt,
as the authors' loop does (kept for benchmarks and for checking that both give the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from .data import load_pixels, time_ids
from .timing import NULL_TIMER

BASE_PROMPT = "a photo of {0}"


@dataclass
class Encoded:
    """One image's or prompt's encodings, stacked along the batch when gathered."""

    mean: torch.Tensor  # latent distribution mean (1, 4, h, w)
    std: torch.Tensor  # latent distribution std  (1, 4, h, w)
    time_ids: torch.Tensor  # (1, 6)


@torch.no_grad()
def encode_prompt(pipe: StableDiffusionXLPipeline, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (1, 77, 2048), pooled (1, 1280)) from both text encoders, via diffusers' own code."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
    return embeds, pooled


@torch.no_grad()
def encode_image(pipe: StableDiffusionXLPipeline, path: Path, resolution: int, device: torch.device) -> Encoded:
    """The VAE latent distribution of one preprocessed image."""
    pixels, crop = load_pixels(path, resolution)
    return encode_pixels(pipe, pixels[None], crop, resolution, device)


@torch.no_grad()
def encode_pixels(
    pipe: StableDiffusionXLPipeline, pixels: torch.Tensor, crop: int, resolution: int, device: torch.device
) -> Encoded:
    vae = pipe.vae
    dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return Encoded(dist.mean, dist.std, time_ids(crop, resolution)[None].to(device))


class Conditioning:
    """Gives the batch tensors for instance (and class) image indices, cached or recomputed."""

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        instance_images: list[Path],
        instance_prompt: str,
        resolution: int,
        device: torch.device,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        cache: bool = True,
        timer=NULL_TIMER,
    ) -> None:
        self.pipe, self.resolution, self.device, self.cache, self.timer = pipe, resolution, device, cache, timer
        self.images = {"instance": instance_images, "class": class_images or []}
        self.prompts = {"instance": instance_prompt, "class": class_prompt}
        self._images: dict[str, list[Encoded]] = {}
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cache:
            for kind, paths in self.images.items():
                if paths:
                    self._images[kind] = [encode_image(pipe, p, resolution, device) for p in paths]
                    self._prompts[kind] = encode_prompt(pipe, self.prompts[kind], device)

    def _image(self, kind: str, index: int) -> Encoded:
        if self.cache:
            return self._images[kind][index]
        pixels, crop = load_pixels(self.images[kind][index], self.resolution)
        with self.timer("vae"):
            return encode_pixels(self.pipe, pixels[None], crop, self.resolution, self.device)

    def _prompt(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache:
            return self._prompts[kind]
        with self.timer("text"):
            return encode_prompt(self.pipe, self.prompts[kind], self.device)

    def batch(self, indices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stacked mean, std, time_ids, prompt_embeds, pooled for the instance indices, then the class ones."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "std", "time_ids", "prompt_embeds", "pooled")}
        for kind in ("instance", "class"):
            if kind not in indices:
                continue
            embeds, pooled = self._prompt(kind)
            for i in indices[kind].tolist():
                enc = self._image(kind, i)
                parts["mean"].append(enc.mean)
                parts["std"].append(enc.std)
                parts["time_ids"].append(enc.time_ids)
                parts["prompt_embeds"].append(embeds)
                parts["pooled"].append(pooled)
        return {k: torch.cat(v) for k, v in parts.items()}
