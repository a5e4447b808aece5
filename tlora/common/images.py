"""Images: listing, opening (EXIF, 16-bit greyscale, transparency), checking, the authors' crops, loss masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tlora.common.errors import UsageError, first_line
from tlora.common.messages import UNREADABLE_IMAGE, note

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")  # not read: training is on photos


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_videos(folder: str | Path) -> list[Path]:
    """Video files directly inside `folder`, sorted by name (what training skips)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def training_images(train_data_dir: str | Path, one_image: str | None = None) -> list[Path]:
    """The instance images: every image of the folder, or only `one_image` (a file name inside it)."""
    if one_image:
        return [Path(train_data_dir) / one_image]
    return list_images(train_data_dir)


MIN_SIDE = 64

WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16/32-bit greyscale: PIL's convert("RGB") clips it

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto (convert("RGB") would keep their colour)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled to 8 bits (plain convert() would clip nearly all of it to white),
    transparent pixels composited onto white (convert() would train the colour hidden under them)."""
    if image.mode in WIDE_GREY:
        grey = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError("floating-point images are not supported; save it as an 8- or 16-bit image")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_alpha(path: str | Path) -> Image.Image:
    """The image's transparency as a greyscale mask (255 = opaque), EXIF orientation applied; all 255 without one."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw)
        return image.convert("RGBA").getchannel("A") if has_alpha(image) else Image.new("L", image.size, 255)


def open_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB, EXIF orientation applied."""
    return _open_rgb(path)[0]


def _open_rgb(path: str | Path) -> tuple[Image.Image, int]:
    """The image as 8-bit RGB, EXIF orientation applied (its first frame), and how many frames the file has."""
    with Image.open(path) as raw:
        return to_rgb(ImageOps.exif_transpose(raw)), getattr(raw, "n_frames", 1)


def check_image(path: Path, flag: str, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Open and decode a training image; one-line UsageError naming the file when it cannot be used, a note when
    it is animated (its first frame is used). Returns its size (EXIF orientation applied)."""
    try:
        image, frames = _open_rgb(path)
    except Exception as err:  # PIL raises many types for bad files
        raise unreadable(flag, path.name, err) from None
    if min(image.size) < min_side:
        raise UsageError(f"{flag}: {path.name} is {image.width}x{image.height}; images need at least {min_side} px on "
                         "each side, remove or replace it")
    if frames > 1:
        note(f"{flag}: {path.name} is animated ({frames} frames); its first frame is used (save that frame alone "
             "to make it so)")
    return image.size


def unreadable(flag: str, name: str | Path, err: Exception) -> UsageError:
    """The one line for an image file that cannot be read: `name` is how the message shows it (a file name, or a
    path)."""
    return UsageError(f"{flag}: {name} {UNREADABLE_IMAGE} ({first_line(err)}); remove or replace it")


def broken_links(folder: str | Path) -> list[Path]:
    """Entries of `folder` named as images that lead nowhere (a link whose target is gone)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.exists())


def _square(image: Image.Image, resolution: int, resize_first: bool) -> tuple[Image.Image, int]:
    """A resolution x resolution image and the side of the square it came from.

    SDXL (the authors' SDXL code): center crop to the short side, then LANCZOS resize. resize_first (the
    authors' FLUX code, torchvision's Resize + CenterCrop): short side LANCZOS-resized to the resolution,
    long side int(resolution * long / short), then a center crop with round((size - resolution) / 2).
    """
    width, height = image.size
    side = min(width, height)
    if resize_first:
        w, h = (resolution, int(resolution * height / width)) if width <= height else (int(resolution * width / height), resolution)
        image = image.resize((w, h), Image.LANCZOS)
        left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
        return image.crop((left, top, left + resolution, top + resolution)), side
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS), side


def load_pixels(path: str | Path, resolution: int, resize_first: bool = False) -> tuple[torch.Tensor, int]:
    """(3, res, res) float tensor in [-1, 1] and the crop size (see _square for the geometry)."""
    image, side = _square(open_rgb(path), resolution, resize_first)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), side


def load_mask(path: str | Path, resolution: int, resize_first: bool = False, alpha: bool = False) -> torch.Tensor:
    """A loss mask (res, res) in [0, 1] from a greyscale (or colour: its luminance) image, or from an image's
    transparency (`alpha`), cropped as the image is."""
    square, _ = _square(open_alpha(path) if alpha else open_rgb(path).convert("L"), resolution, resize_first)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)


def find_mask(mask_dir: str | Path, image: Path) -> Path | None:
    """The mask of a training image: the file in mask_dir with the image's name, or its stem and any image suffix."""
    folder = Path(mask_dir)
    for candidate in [folder / image.name, *(folder / f"{image.stem}{s}" for s in IMAGE_EXTENSIONS)]:
        if candidate.is_file():
            return candidate
    return None
