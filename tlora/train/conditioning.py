"""What the denoiser is conditioned on during training: image latents, prompt embeddings, loss masks.

With `cache=True` (the default) each training image's latent distribution (mean, std) and each prompt's
embeddings are computed once; every step then samples latents from the cached distribution, as a fresh
VAE encode would. With `cache=False` every step reloads, re-crops and re-encodes the image and the prompt,
as the authors' loop does (kept for benchmarks and for checking that both give the same numbers).
What is encoded, and how, is the model family's (see tlora/families/). On a video family (Wan) the training items
are clips (a photo: one frame), encoded as videos; class images stay photos.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tlora.common.images import clip_frames, load_clip, load_mask, load_pixels
from tlora.train.timing import NULL_TIMER


@torch.no_grad()
def encode_image(family, pipe, path: Path, resolution: int, device: torch.device, mask: Path | None = None,
                 alpha: bool = False, clip: bool = False) -> dict[str, torch.Tensor]:
    """One preprocessed image's encodings, as its `family` makes them; `clip` (a video family's training item): its
    first 4k + 1 frames as a video, (1, 3, N, H, W) (images.load_clip); with `mask`, its loss mask at the latents'
    size, (1, 1, h, w) (`alpha`: the mask file's transparency)."""
    frames = clip_frames(family) if clip else None
    if frames:
        pixels, crop = load_clip(path, resolution, family.resize_first, *frames)
    else:
        pixels, crop = load_pixels(path, resolution, family.resize_first)
    encoded = family.encode_pixels(pipe, pixels[None], crop, resolution, device)
    if mask is not None:
        pixel_mask = load_mask(mask, resolution, family.resize_first, alpha)[None, None].to(device)
        encoded["mask"] = F.interpolate(pixel_mask, size=encoded["mean"].shape[-2:], mode="area")
    return encoded


class Conditioning:
    """Gives the batch tensors for instance (and class) image indices, cached or recomputed."""

    def __init__(
        self,
        family,
        pipe,
        instance_images: list[Path],
        instance_prompt: str,
        resolution: int,
        device: torch.device,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        cache: bool = True,
        timer=NULL_TIMER,
        masks: list[Path] | None = None,
        max_sequence_length: int = 512,
        alpha_masks: bool = False,
    ) -> None:
        self.family, self.pipe, self.resolution, self.device = family, pipe, resolution, device
        self.cache, self.timer = cache, timer
        self.images = {"instance": instance_images, "class": class_images or []}
        self.masks = {"instance": masks, "class": [None] * len(class_images or []) if masks else None}
        self.prompts = {"instance": instance_prompt, "class": class_prompt}
        self.alpha_masks = alpha_masks  # the masks are the images' transparency (--alpha_mask)
        self.max_sequence_length = max_sequence_length
        self._images: dict[str, list[dict]] = {}
        self._prompts: dict[str, dict] = {}
        if cache:
            for kind, paths in self.images.items():
                if paths:
                    self._images[kind] = [self._encode_image(kind, i) for i in range(len(paths))]
                    self._prompts[kind] = self._encode_prompt(kind)

    def _encode_image(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        masks = self.masks[kind]
        encoded = encode_image(self.family, self.pipe, self.images[kind][index], self.resolution, self.device,
                               masks[index] if masks else None, self.alpha_masks, clip=kind == "instance")
        if masks and "mask" not in encoded:  # class images: the whole image counts
            encoded["mask"] = torch.ones_like(encoded["mean"][:, :1])
        return encoded

    def _encode_prompt(self, kind: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.family.encode_prompt(self.pipe, self.prompts[kind], self.device, self.max_sequence_length)

    def _image(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        if self.cache:
            return self._images[kind][index]
        with self.timer("vae"):
            return self._encode_image(kind, index)

    def _prompt(self, kind: str) -> dict[str, torch.Tensor]:
        if self.cache:
            return self._prompts[kind]
        with self.timer("text"):
            return self._encode_prompt(kind)

    def batch(self, indices: dict[str, torch.Tensor]) -> dict:
        """Every image and prompt tensor, stacked: the instance indices first, then the class ones. Class photos of
        another shape than the instance rows (clips on a video family) are not stacked with them but given apart, as
        `batch["class"]` (objective.diffusion_loss predicts them in a call of their own)."""
        kinds = {kind: self._stack(kind, indices[kind]) for kind in ("instance", "class") if kind in indices}
        instance, other = kinds.get("instance", {}), kinds.get("class")
        if other is None or not instance:
            return instance or other
        if all(instance[k].shape[1:] == other[k].shape[1:] for k in instance):
            return {k: torch.cat([instance[k], other[k]]) for k in instance}
        return instance | {"class": other}

    def _stack(self, kind: str, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        prompt = self._prompt(kind)
        for i in indices.tolist():
            for key, value in (self._image(kind, i) | prompt).items():
                parts.setdefault(key, []).append(value)
        return {k: torch.cat(v) for k, v in parts.items()}
