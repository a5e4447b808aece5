"""Video pipelines (Wan) in the image sampling path: a video is sampled as the image pipelines' images are, its first
frame saved as `<k>.png` (what the prompt folder's grid, the records and the metrics read), and beside it, for more
than one frame, the video (`<k>.mp4` when imageio-ffmpeg or PyAV is installed, else `<k>.gif` with its frames as
`<k>_frames/<i>.png`) and a contact sheet of its frames (`<k>_sheet.png`)."""

from __future__ import annotations

import inspect
import io
import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.messages import note

FPS = 16  # Wan 2.1's frame rate (diffusers' Wan examples export at 16)
SHEET_FRAMES = 16  # frames on a contact sheet at most, evenly spaced
_said = False  # the GIF fallback is said once per process


def makes_videos(pipeline_class: type) -> bool:
    """Whether a pipeline class makes videos (its call counts videos per prompt, not images)."""
    return "num_videos_per_prompt" in inspect.signature(pipeline_class.__call__).parameters


class AsImages:
    """A video pipeline called as the sampling path calls image pipelines: `num_images_per_prompt` is its
    `num_videos_per_prompt`; `.images` are each video's first frame, carrying every frame (`video_frames`)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, num_images_per_prompt: int = 1, **kwargs) -> SimpleNamespace:
        out = self.pipe(num_videos_per_prompt=num_images_per_prompt, output_type="pil", **kwargs)
        images = []
        for frames in out.frames:
            first = frames[0].copy()
            first.video_frames = list(frames)
            images.append(first)
        return SimpleNamespace(images=images)


def as_images(pipe):
    """`pipe` itself for an image pipeline; a video pipeline wrapped in AsImages."""
    return AsImages(pipe) if makes_videos(type(pipe)) else pipe


def frames_kwargs(flag: str, value: int | None, family) -> dict[str, int]:
    """The pipeline-call `num_frames` for --num_frames (none when not given), checked against the family."""
    if value is None:
        return {}
    if not makes_videos(family.pipeline_class):
        raise UsageError(f"{flag} is for video models; {family.name} makes images: drop the flag")
    step = getattr(family, "frames_multiple", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (value - 1) % step:
        near = max(1, (int(value) - 1) // step * step + 1) if isinstance(value, int) else 1
        raise UsageError(f"{flag} must be {step}k + 1 frames (1, {1 + step}, {1 + 2 * step}, ...) for {family.name}, "
                         f"got {value}; pass e.g. {near}")
    return {"num_frames": value}


def contact_sheet(frames: list[Image.Image]) -> Image.Image:
    """Up to SHEET_FRAMES frames, evenly spaced, in a near-square grid, row by row."""
    picked = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(len(frames), SHEET_FRAMES))]
    columns = math.ceil(math.sqrt(len(picked)))
    rows = math.ceil(len(picked) / columns)
    width, height = picked[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, frame in enumerate(picked):
        sheet.paste(frame, ((i % columns) * width, (i // columns) * height))
    return sheet


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _mp4_writer():
    """A function writing frames to an mp4 path, from imageio-ffmpeg or PyAV; None when neither is installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        def write(frames: list[Image.Image], path: Path) -> None:
            writer = imageio_ffmpeg.write_frames(str(path), frames[0].size, fps=FPS, macro_block_size=1)  # yuv420p
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
            writer.close()
        return write
    try:
        import av
    except ImportError:
        return None

    def write_av(frames: list[Image.Image], path: Path) -> None:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
            container.mux(stream.encode())
    return write_av


def save_video(frames: list[Image.Image], folder: Path, k: int) -> Path:
    """Video k of a prompt folder: `<k>.mp4`, else `<k>.gif` and `<k>_frames/<i>.png`; and `<k>_sheet.png`."""
    global _said
    write = _mp4_writer()
    atomic_write(folder / f"{k}_sheet.png", _png(contact_sheet(frames)))
    if write is not None:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{k}.", suffix=".mp4")
        os.close(fd)
        try:
            write(frames, Path(tmp))
            os.replace(tmp, folder / f"{k}.mp4")
        finally:
            Path(tmp).unlink(missing_ok=True)
        return folder / f"{k}.mp4"
    if not _said:
        _said = True
        note("no mp4 writer is installed: videos are saved as animated GIFs with their frames as PNG; "
             "pip install imageio-ffmpeg for mp4")
    for i, frame in enumerate(frames):
        atomic_write(folder / f"{k}_frames" / f"{i:03d}.png", _png(frame))
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / FPS), loop=0)
    atomic_write(folder / f"{k}.gif", buf.getvalue())
    return folder / f"{k}.gif"


def save_videos(images: list[Image.Image], folder: Path) -> list[Path]:
    """The videos behind a prompt folder's images (those carrying more than one frame; none for an image
    pipeline's)."""
    return [save_video(image.video_frames, Path(folder), k) for k, image in enumerate(images)
            if len(getattr(image, "video_frames", ())) > 1]
