"""Images and clips: listing, opening (EXIF, 16-bit greyscale, transparency), checking, the authors' crops, loss
masks. A clip (a video file, a GIF, an animated WebP or PNG) trains on a video family (Wan) as its first frames, each
preprocessed as a photo is; image families skip video files and GIFs with a note, and use an animated photo's first
frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from tlora.common.errors import UsageError, first_line
from tlora.common.messages import UNREADABLE_IMAGE, note

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")  # read with PyAV (a video family's clips)
CLIP_EXTENSIONS = (".gif", *VIDEO_EXTENSIONS)  # clips whatever their frame count (a still GIF: a one-frame clip)
NEEDS_AV = "reading its frames needs PyAV: pip install av"


def list_images(folder: str | Path, clips: bool = False) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; with `clips`, clip files (videos, GIFs) among them."""
    extensions = IMAGE_EXTENSIONS + (CLIP_EXTENSIONS if clips else ())
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in extensions)


def list_clips(folder: str | Path) -> list[Path]:
    """Clip files (videos, GIFs) directly inside `folder`, sorted by name (what an image family skips)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in CLIP_EXTENSIONS)


def training_images(train_data_dir: str | Path, one_image: str | None = None, clips: bool = False) -> list[Path]:
    """The instance images (`clips`: and clips): every one of the folder, or only `one_image` (a file name in it)."""
    if one_image:
        return [Path(train_data_dir) / one_image]
    return list_images(train_data_dir, clips)


def clip_frames(family) -> tuple[int, int] | None:
    """A family that trains on clips: (its frames' multiple, the most frames of a clip that train); None for a family
    that trains on photos only."""
    most = getattr(family, "clip_frames", 1)
    return (getattr(family, "frames_multiple", 1), most) if most > 1 else None


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
    _check_side(flag, path.name, image.size, min_side, "images")
    if frames > 1:
        note(f"{flag}: {path.name} is animated ({frames} frames); its first frame is used (save that frame alone "
             "to make it so)")
    return image.size


def frames_used(count: int, step: int, most: int) -> int:
    """How many first frames of a clip of `count` train: the largest step * k + 1 at most `count` and `most` (Wan's
    VAE encodes 4k + 1 frames: 1, 5, 9, ...)."""
    return (min(count, most) - 1) // step * step + 1


def open_frames(path: str | Path, most: int) -> tuple[list[Image.Image], int | None]:
    """A clip's (or photo's) first `most` frames as 8-bit RGB, and how many frames it has (None: a video with more
    than `most` that does not say how many). Images (GIF, WebP, PNG) through PIL, each frame as open_rgb opens the
    first; video files through PyAV (ImportError without it)."""
    if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
        return _video_frames(path, most)
    with Image.open(path) as raw:
        frames = [to_rgb(ImageOps.exif_transpose(frame)) for _, frame in zip(range(most), ImageSequence.Iterator(raw))]
        return frames, getattr(raw, "n_frames", 1)


def _video_frames(path: str | Path, most: int) -> tuple[list[Image.Image], int | None]:
    import av  # optional: only clips need it (checks.py refuses a video without it before any model loads)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = []
        for frame in container.decode(stream):
            # a phone's portrait video: its display matrix turns it upright, as EXIF does a photo (PyAV >= 14 says the
            # angle, counterclockwise as PIL's rotate turns)
            frames.append(frame.to_image().convert("RGB").rotate(getattr(frame, "rotation", 0), expand=True))
            if len(frames) > most:
                break
        counted = len(frames) if len(frames) <= most else None
        return frames[:most], stream.frames or counted


def check_clip(path: Path, flag: str, step: int, most: int, min_side: int = MIN_SIDE
               ) -> tuple[tuple[int, int], int, int | None]:
    """Open and decode a training clip (a photo: one frame); one-line UsageError naming the file when it cannot be
    used. Returns its size, how many first frames train (frames_used) and how many it has (None: not said)."""
    try:
        frames, count = open_frames(path, most)
    except ImportError:
        raise UsageError(f"{flag}: {path.name} is a video; {NEEDS_AV} (or remove it from {path.parent})") from None
    except Exception as err:  # PIL and PyAV raise many types for bad files
        raise unreadable(flag, path.name, err, video=path.suffix.lower() in VIDEO_EXTENSIONS) from None
    if not frames:
        raise UsageError(f"{flag}: {path.name} holds no frames; remove or replace it")
    _check_side(flag, path.name, frames[0].size, min_side, "clips")
    return frames[0].size, frames_used(len(frames), step, most), count


def _check_side(flag: str, name: str, size: tuple[int, int], min_side: int, what: str) -> None:
    if min(size) < min_side:
        raise UsageError(f"{flag}: {name} is {size[0]}x{size[1]}; {what} need at least {min_side} px on each side, "
                         "remove or replace it")


def unreadable(flag: str, name: str | Path, err: Exception, video: bool = False) -> UsageError:
    """The one line for an image (`video`: a video) file that cannot be read: `name` is how the message shows it (a
    file name, or a path)."""
    what = "is not a readable video" if video else UNREADABLE_IMAGE
    return UsageError(f"{flag}: {name} {what} ({first_line(err)}); remove or replace it")


def broken_links(folder: str | Path, clips: bool = False) -> list[Path]:
    """Entries of `folder` named as images (`clips`: or clips) that lead nowhere (a link whose target is gone)."""
    extensions = IMAGE_EXTENSIONS + (CLIP_EXTENSIONS if clips else ())
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in extensions and not p.exists())


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


def _pixels(image: Image.Image) -> torch.Tensor:
    """(3, h, w) float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_pixels(path: str | Path, resolution: int, resize_first: bool = False) -> tuple[torch.Tensor, int]:
    """(3, res, res) float tensor in [-1, 1] and the crop size (see _square for the geometry)."""
    image, side = _square(open_rgb(path), resolution, resize_first)
    return _pixels(image), side


def load_clip(path: str | Path, resolution: int, resize_first: bool, step: int, most: int
              ) -> tuple[torch.Tensor, int]:
    """(3, N, res, res) float tensor in [-1, 1] and the crop size: the clip's first N = frames_used frames, each
    preprocessed exactly as load_pixels preprocesses a photo (a photo: N = 1, load_pixels' tensor)."""
    frames, _ = open_frames(path, most)
    squares = [_square(frame, resolution, resize_first) for frame in frames[:frames_used(len(frames), step, most)]]
    return torch.stack([_pixels(image) for image, _ in squares], 1), squares[0][1]


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
