"""Generating and saving images for '#'-separated prompt templates, with the authors' seeds and layout.

Layout: `<checkpoint>/samples/ns<steps>_gs<guidance>/version_<v>/<template with {0} = token>/<k>.png`
(FLUX: `ns<steps>gs<guidance>`, as the authors' FLUX code names it; see families/),
plus `grid.png` in each prompt folder and `prompts.yaml` beside the prompt folders (with the full prompt
text; folder names are made safe, short and distinct, see Sampling.prompt_folders).
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image

from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.messages import note
from tlora.common.safe_names import is_safe, safe_component
from tlora.common.text_files import load_yaml, read_text
from tlora.generate import video

RESERVED = frozenset({"prompts.yaml", "metrics.json"})  # files beside the prompt folders
SIDES = ("height", "width")


def image_size(flags: tuple[str, str], height: int | None, width: int | None, multiple: int) -> dict[str, int]:
    """The pipeline-call size arguments for the sizes given, each a positive multiple of `multiple` (the family's
    pixels per latent: SDXL 8, FLUX 16); a size not given is left to the pipeline's default, as the authors' tools
    sample (FluxPipeline: 1024 px whatever the run was trained at)."""
    for flag, value in zip(flags, (height, width)):
        if value is not None and (value < multiple or value % multiple):
            raise UsageError(f"{flag} must be a positive multiple of {multiple} pixels for this model, got {value}; "
                             f"pass e.g. {max(multiple, value // multiple * multiple)}")
    return {key: value for key, value in zip(SIDES, (height, width)) if value is not None}


def distilled_defaults(family, model: str, revision: str | None, steps_given: bool = False,
                       guidance_given: bool = False) -> tuple[str, str] | None:
    """(what is wrong, the flags to pass) when sampling a family whose published model is step-distilled
    (`Family.distilled_sampling`: its name, steps, guidance) would use the pipeline's defaults, made for the base
    model (a flag not given); None when nothing is: no such model, both flags given, or a model_index.json that
    records `is_distilled: false` (FLUX.2 [klein]'s base models)."""
    from tlora import families

    distilled = family.distilled_sampling
    if distilled is None or (steps_given and guidance_given):
        return None
    try:
        if families.model_index(model, revision).get("is_distilled") is False:
            return None
    except UsageError:  # unreadable here: the model's own checks say so
        pass
    name, steps, guidance = distilled
    return (f"{family.pipeline_class.__name__}'s defaults, {family.inference_steps} steps at guidance "
            f"{family.inference_guidance:g}, are for the base model; {name} is step-distilled for {steps} steps "
            f"at guidance {guidance:g}", f"--num_inference_steps {steps} --guidance_scale {guidance:g}")


def other_size(entry: dict, size: dict[str, int]) -> str | None:
    """"WxH" of a prompt folder's images when its record says they were made at another size than the one asked
    for (only a size asked for explicitly is compared: the pipeline's own is known once it has run)."""
    made = entry.get("size")
    if not (isinstance(made, list) and len(made) == 2) or not size:
        return None
    width, height = made
    if size.get("width", width) == width and size.get("height", height) == height:
        return None
    return f"{width}x{height}"


def prompt_seed(template: str, batch_index: int, seed: int) -> int:
    """The authors' per-batch seed: sum of the template's character codes + batch index + --seed."""
    return sum(ord(c) for c in template) + batch_index + seed


@dataclass
class Sampling:
    """What a generation run does; `folder` is the version folder that receives the prompt folders."""

    placeholder_token: str
    class_name: str
    folder: Path
    num_images_per_prompt: int = 5
    batch_size: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    replace: bool = False
    call_kwargs: dict = field(default_factory=dict)  # more pipeline arguments: height, width, max_sequence_length
    guidance_arg: str = "guidance_scale"  # the pipeline call's name for the CFG weight (Qwen-Image: true_cfg_scale)

    def text(self, template: str) -> str:
        return template.format(f"{self.placeholder_token} {self.class_name}")

    def prompt_folders(self, templates: list[str], record: dict[str, dict]) -> dict[str, Path]:
        """Each distinct template's folder inside `folder`: the authors' name (the template with {0} = token) when it
        is a safe folder name that no other template claims, earlier in `templates` or in the `record` of the
        folder (prompts.yaml); else that name cleaned, with `-<8 hex of sha256 of the template>`. Two templates
        never share a folder."""
        claimed = {same(name): entry.get("prompt") for name, entry in record.items()}
        folders: dict[str, Path] = {}
        for template in dict.fromkeys(templates):
            name = template.format(self.placeholder_token)
            if not is_safe(name, reserved=RESERVED) or claimed.get(same(name), template) != template:
                name = safe_component(name, reserved=RESERVED, digest_of=template)
            claimed.setdefault(same(name), template)
            folders[template] = self.folder / name
        return folders


def same(name: str) -> str:
    """What a folder name is to a file system that ignores case or Unicode normalization (macOS, Windows)."""
    return unicodedata.normalize("NFC", name).casefold()


def read_record(folder: Path) -> dict[str, dict]:
    """A version folder's prompts.yaml (prompt folder -> its record); {} when absent or empty."""
    path = Path(folder) / "prompts.yaml"
    if not path.is_file():
        return {}
    fix = "delete or fix it"
    record = load_yaml(read_text(path, "the samples' record", fix), str(path), fix) or {}
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a mapping of prompt folders; {fix}")
    return {k: v for k, v in record.items() if isinstance(k, str) and isinstance(v, dict)}


def is_done(folder: Path, template: str, record: dict[str, dict], count: int) -> bool:
    """A prompt folder holds `count` images and no record says they are of another prompt."""
    entry = record.get(folder.name)
    return (entry is None or entry.get("prompt") == template) and len(existing_images(folder)) >= count


def existing_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if p.stem.isdigit()) if folder.is_dir() else []


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def grid(images: list[Image.Image]) -> Image.Image:
    """All images side by side."""
    width, height = sum(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (width, height))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


@torch.no_grad()
def generate_prompt(pipe, template: str, cfg: Sampling) -> tuple[list[Image.Image], list[int]]:
    """cfg.num_images_per_prompt images for one template, in batches of cfg.batch_size."""
    pipe = video.as_images(pipe)  # a video pipeline: each video's first frame, carrying its frames
    images, seeds = [], []
    num_batches = -(-cfg.num_images_per_prompt // cfg.batch_size)
    for i in range(num_batches):
        seed = prompt_seed(template, i, cfg.seed)
        count = min(cfg.batch_size, cfg.num_images_per_prompt - i * cfg.batch_size)
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        out = pipe(
            prompt=cfg.text(template),
            generator=generator,
            num_images_per_prompt=count,
            num_inference_steps=cfg.num_inference_steps,
            **{cfg.guidance_arg: cfg.guidance_scale},
            **cfg.call_kwargs,
        )
        images += out.images
        seeds.append(seed)
    return images, seeds


def save_images(images: list[Image.Image], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        atomic_write(folder / f"{k}.png", _png(image))
    atomic_write(folder / "grid.png", _png(grid(images)))


def run(pipe, templates: list[str], cfg: Sampling, checkpoint: str = "", progress=None) -> dict[str, list[Image.Image]]:
    """Generate and save every template not already done; returns the new images by template."""
    done: dict[str, list[Image.Image]] = {}
    record_path = cfg.folder / "prompts.yaml"
    record = read_record(cfg.folder)
    for template, folder in cfg.prompt_folders(templates, record).items():
        if not cfg.replace and is_done(folder, template, record, cfg.num_images_per_prompt):
            if made := other_size(record.get(folder.name, {}), {k: v for k, v in cfg.call_kwargs.items() if k in SIDES}):
                note(f"{folder} is done and kept as it is, at {made}; pass --replace_inference_output (or another "
                     "--version) to make it at the size asked for")
            if progress is not None:
                progress.update(cfg.num_images_per_prompt)
            continue
        images, seeds = generate_prompt(pipe, template, cfg)
        save_images(images, folder)
        video.save_videos(images, folder)  # <k>.mp4 (or .gif and frames) and <k>_sheet.png beside <k>.png
        done[template] = images
        record[folder.name] = {
            "prompt": template, "text": cfg.text(template), "seeds": seeds, "num_images": len(images),
            "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
            "checkpoint": str(checkpoint), "size": list(images[0].size),
        }
        atomic_write(record_path, yaml.safe_dump(record, sort_keys=False, allow_unicode=True).encode())
        if progress is not None:
            progress.update(len(images))
    return done
