"""The paper's metrics: IS (CLIP image similarity), DINO-IS (DINO image similarity), TS (CLIP text similarity).

IS      = mean cosine similarity of CLIP image embeddings, reference image(s) x generated images
DINO-IS = the same with DINO ViT CLS embeddings
TS      = mean cosine similarity of each prompt's CLIP text embedding with the CLIP embeddings of its images
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

from tlora.common.hub import model_load_error
from tlora.common.images import IMAGE_EXTENSIONS, list_images, open_rgb

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
MASK_COLOUR = (127, 127, 127)


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Embedders:
    """CLIP and DINO, loaded with from_pretrained from a hub name or a local folder."""

    clip: CLIPModel
    clip_processor: CLIPProcessor
    dino: torch.nn.Module
    dino_processor: object
    device: torch.device
    batch_size: int = 32

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, device: str | None = None, batch_size: int = 32):
        """Both models; one-line UsageError naming the model that could not be loaded."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            clip_parts = CLIPModel.from_pretrained(clip).to(device).eval(), CLIPProcessor.from_pretrained(clip)
        except OSError as err:
            raise model_load_error("--clip_model", clip, err) from None
        try:
            dino_parts = AutoModel.from_pretrained(dino).to(device).eval(), AutoImageProcessor.from_pretrained(dino)
        except OSError as err:
            raise model_load_error("--dino_model", dino, err) from None
        return cls(*clip_parts, *dino_parts, device, batch_size)

    def _batches(self, images: list[Image.Image]):
        for i in range(0, len(images), self.batch_size):
            yield images[i : i + self.batch_size]

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.clip.get_image_features(pixel_values=pixels)))
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        feats = self.clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_features(feats).float(), dim=-1)

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for batch in self._batches(images):
            pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.dino(pixel_values=pixels).last_hidden_state[:, 0])
        return F.normalize(torch.cat(out).float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two L2-normalised matrices."""
    return float((a @ b.T).mean())


def mask_background(image: Image.Image, mask: Image.Image, colour: tuple[int, int, int] = MASK_COLOUR) -> Image.Image:
    """Keep the subject (mask > 127) and paint the rest a flat colour."""
    keep = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) > 127
    pixels = np.asarray(image).copy()
    pixels[~keep] = colour
    return Image.fromarray(pixels)


def reference_images(reference: str | Path, mask_dir: str | Path | None = None) -> list[Image.Image]:
    """The reference image(s), backgrounds masked when a mask with the same file stem is in mask_dir."""
    reference = Path(reference)
    paths = list_images(reference) if reference.is_dir() else [reference]
    if not paths:
        raise ValueError(f"no reference images in {reference}")
    images = []
    for path in paths:
        image = open_rgb(path)
        if mask_dir:
            masks = [p for p in Path(mask_dir).glob(path.stem + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not masks:
                raise ValueError(f"--mask_dir: no mask named {path.stem}.* in {mask_dir}")
            image = mask_background(image, open_rgb(masks[0]))
        images.append(image)
    return images
