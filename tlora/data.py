"""Training images: listing, the authors' preprocessing, and SDXL's size conditioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def training_images(train_data_dir: str | Path, one_image: str | None = None) -> list[Path]:
    """The instance images: every image of the folder, or only `one_image` (a file name inside it)."""
    if one_image:
        return [Path(train_data_dir) / one_image]
    return list_images(train_data_dir)


def load_pixels(path: str | Path, resolution: int) -> tuple[torch.Tensor, int]:
    """(3, res, res) float tensor in [-1, 1] and the crop size: center crop to the short side, LANCZOS resize."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), side


def time_ids(crop_size: int, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning: original size (crop, crop), crop top-left (0, 0), target (res, res)."""
    return torch.tensor([crop_size, crop_size, 0, 0, resolution, resolution], dtype=torch.float32)


class PairedIndices(Dataset):
    """Index i pairs instance image i % n_instance with class image i % n_class (DreamBooth's pairing)."""

    def __init__(self, num_instance: int, num_class: int = 0) -> None:
        self.num_instance, self.num_class = num_instance, num_class

    def __len__(self) -> int:
        return max(self.num_instance, self.num_class)

    def __getitem__(self, i: int) -> dict[str, int]:
        item = {"instance": i % self.num_instance}
        if self.num_class:
            item["class"] = i % self.num_class
        return item


class ImageFiles(Dataset):
    """Decoded, cropped pixels of a list of files, for training without the latent cache."""

    def __init__(self, paths: list[Path], resolution: int) -> None:
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        pixels, crop = load_pixels(self.paths[i], self.resolution)
        return {"pixels": pixels, "crop_size": crop}
