"""`python -m tlora.evaluate`: IS, DINO-IS and TS of generated images laid out as inference.py writes them.

    python -m tlora.evaluate --reference dog_example/02.jpg \
        --samples RUN/checkpoint-800/samples/ns25_gs5.0/version_0 --class_name dog --placeholder_token sks

IS and DINO-IS use the images of the base prompt "a photo of {0}"; TS uses every other prompt, with {0}
replaced by the class name alone (the placeholder token means nothing to CLIP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from tlora.common.commands import run_command
from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.flags import Parser
from tlora.common.hub import check_model_source
from tlora.common.images import IMAGE_EXTENSIONS, check_image, list_images, open_rgb, unreadable
from tlora.common.messages import NEW_PATH
from tlora.common.prompts import BASE_PROMPT, MAX_WORD_LENGTH, check_templates, check_text
from tlora.common.values import check_count, check_device, shown
from tlora.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO, Embedders, mean_cosine, reference_images
from tlora.generate.generation import existing_images, read_record

TS_TEXT = "prompt with {0} replaced by the class name alone"


def prompt_folders(samples: Path, placeholder_token: str) -> dict[str, Path]:
    """Prompt template -> folder, from prompts.yaml when present, else from the folder names."""
    record = read_record(samples)
    folders = {}
    for folder in sorted(p for p in samples.iterdir() if p.is_dir() and existing_images(p)):
        entry = record.get(folder.name) or {}
        template = entry.get("prompt") or " ".join("{0}" if w == placeholder_token else w for w in folder.name.split())
        if not isinstance(template, str):
            raise UsageError(f"--samples: {samples / 'prompts.yaml'} gives the prompt of {folder.name} as "
                             f"{shown(template)}, not text; delete or fix it")
        check_templates(f"--samples: the prompt of {folder}", [template])
        folders[template] = folder
    return folders


def sample_folders(samples: Path, placeholder_token: str) -> dict[str, Path]:
    """`prompt_folders` of a samples folder, which must have one: one line naming it otherwise."""
    folders = prompt_folders(samples, placeholder_token)
    if not folders:
        raise UsageError(f"--samples: no prompt folders with images in {samples}; run inference.py first")
    return folders


def _open(path: Path, flag: str):
    """An image the metrics read, as RGB; one line naming it when it cannot be read."""
    try:
        return open_rgb(path)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise unreadable(flag, path, err) from None


def evaluate_samples(
    embedders: Embedders,
    references: list,
    samples: str | Path,
    class_name: str,
    placeholder_token: str,
    groups: dict[str, list[str]] | None = None,
) -> dict:
    """Metrics of one samples folder; `groups` (name -> templates) adds a TS per group (e.g. contextual)."""
    folders = sample_folders(Path(samples), placeholder_token)
    base = folders.get(BASE_PROMPT)
    is_images = [_open(p, "--samples") for p in existing_images(base)] if base else []
    result: dict = {"samples": str(samples), "class_name": class_name, "ts_text": TS_TEXT, "base_prompt": BASE_PROMPT}
    if is_images:
        result["IS"] = mean_cosine(embedders.clip_images(references), embedders.clip_images(is_images))
        result["DINO_IS"] = mean_cosine(embedders.dino_images(references), embedders.dino_images(is_images))
        result["num_base_images"] = len(is_images)
    per_prompt = {}
    for template, folder in tqdm(folders.items(), desc="TS", unit="prompt", leave=False):
        if template == BASE_PROMPT:
            continue
        text = embedders.clip_texts([template.format(class_name)])
        images = [_open(p, "--samples") for p in existing_images(folder)]
        per_prompt[template] = mean_cosine(text, embedders.clip_images(images))
    result["TS_per_prompt"] = per_prompt
    if per_prompt:
        result["TS"] = sum(per_prompt.values()) / len(per_prompt)
    for name, templates in (groups or {}).items():
        scores = [per_prompt[t] for t in templates if t in per_prompt]
        if scores:
            result[f"TS_{name}"] = sum(scores) / len(scores)
    return result


def table(result: dict) -> str:
    keys = [k for k in ("IS", "DINO_IS", "TS", "TS_contextual", "TS_complex") if k in result]
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + " | ".join(
        f"{result[k]:.4f}" for k in keys) + " |"


HUB_OR_FOLDER = "hub id or local folder"
REFERENCE_FIX = "pass an image or a folder of images"


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="Reference image or folder of images.")
    p.add_argument("--samples", required=True, help="A version folder written by inference.py.")
    p.add_argument("--class_name", required=True)
    p.add_argument("--placeholder_token", required=True)
    p.add_argument("--mask_dir", default=None, help="Subject masks named like the reference images.")
    p.add_argument("--clip_model", default=DEFAULT_CLIP, help=f"CLIP model: {HUB_OR_FOLDER}.")
    p.add_argument("--dino_model", default=DEFAULT_DINO, help=f"DINO ViT model: {HUB_OR_FOLDER}.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="JSON file (default: metrics.json in --samples, rewritten on each "
                                                  "run); an existing --output only with --overwrite.")
    p.add_argument("--overwrite", action="store_true", default=False, help="Replace an existing --output.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every input (images, folders, model names) before any model loads."""
    args = build_parser().parse_args(argv)
    if Path(args.samples).is_file():
        raise UsageError(f"--samples: {args.samples} is a file; pass the version folder that holds it")
    if not Path(args.samples).is_dir():
        raise UsageError(f"--samples: {args.samples} is not a folder; pass a version folder written by inference.py")
    folders = sample_folders(Path(args.samples), args.placeholder_token)
    if not Path(args.reference).exists():
        raise UsageError(f"--reference: {args.reference} does not exist; {REFERENCE_FIX}")
    if args.mask_dir and not Path(args.mask_dir).is_dir():
        raise UsageError(f"--mask_dir: {args.mask_dir} is not a folder; pass the folder of the reference images' masks")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UsageError(f"--output: {args.output} exists; {NEW_PATH}")
    _check_output(Path(args.output or Path(args.samples) / "metrics.json"), "--output" if args.output else "--samples")
    check_text("--class_name", args.class_name, MAX_WORD_LENGTH)
    check_text("--placeholder_token", args.placeholder_token, MAX_WORD_LENGTH)
    check_count("--batch_size", args.batch_size)
    check_device(args.device)
    for folder in folders.values():
        for image in existing_images(folder):
            check_readable(image, "--samples")
    args.references = _references(args.reference, args.mask_dir)
    check_embedders("--clip_model", args.clip_model, "--dino_model", args.dino_model)
    return args


def check_embedders(clip_flag: str, clip: str, dino_flag: str, dino: str) -> None:
    """The CLIP and DINO models can be had (a folder, or the cache when offline) and their config.json, where it
    can be read without the network, is a JSON object; CLIP's says it is a CLIP model."""
    from tlora.common.text_files import read_json
    from tlora.families.model_checks import cached_file

    for flag, name in ((clip_flag, clip), (dino_flag, dino)):
        check_model_source(flag, name, "config.json")
        path = cached_file(name, "config.json")
        if path is None:
            continue
        config = read_json(path, flag, "pass a CLIP or DINO model folder (transformers layout) or hub id")
        if flag == clip_flag and config.get("model_type") != "clip":
            raise UsageError(f"{flag}: {name} is not a CLIP model (its config.json says model_type "
                             f"{shown(config.get('model_type'))}); pass a CLIP model such as {DEFAULT_CLIP}")


def _check_output(path: Path, flag: str) -> None:
    """The metrics file can be written: not a folder, in a folder this process can write (or create)."""
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; pass a file path for the metrics (JSON)")
    existing = next(p for p in [path.parent, *path.absolute().parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write the metrics in {existing}; pass an --output in a folder you can "
                         "write to")


def check_readable(path: Path, flag: str) -> None:
    """An image file PIL can open and whose data is whole (read, not decoded: cheap for hundreds of samples)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise unreadable(flag, path, err) from None


def _references(reference: str, mask_dir: str | None) -> list:
    """The reference images (masked), each checked to be a readable image, and a mask for each."""
    path = Path(reference)
    paths = list_images(path) if path.is_dir() else [path]
    if not paths:
        raise UsageError(f"--reference: no images ({', '.join(IMAGE_EXTENSIONS)}) in {reference}; {REFERENCE_FIX}")
    for image in paths:
        check_image(image, "--reference", min_side=1)
        if mask_dir:
            masks = [p for p in Path(mask_dir).glob(image.stem + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not masks:
                raise UsageError(f"--mask_dir: no mask named {image.stem}.* in {mask_dir}; add one (white = the "
                                 "subject)")
            check_image(masks[0], "--mask_dir", min_side=1)
    return reference_images(reference, mask_dir)


def run(args: argparse.Namespace) -> dict:
    embedders = Embedders.load(args.clip_model, args.dino_model, args.device, args.batch_size)
    result = evaluate_samples(embedders, args.references, args.samples, args.class_name, args.placeholder_token)
    result |= {"clip_model": args.clip_model, "dino_model": args.dino_model, "reference": args.reference}
    output = Path(args.output or Path(args.samples) / "metrics.json")
    atomic_write(output, json.dumps(result, indent=2).encode())
    print(table(result))
    print(f"written: {output}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(parse_args, run, None, argv)


if __name__ == "__main__":
    sys.exit(main())
