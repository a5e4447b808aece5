"""`python -m tlora.evaluate`: IS, DINO-IS and TS of generated images laid out as inference.py writes them.

    python -m tlora.evaluate --reference dog_example/02.jpg \
        --samples RUN/checkpoint-800/samples/ns25_gs5.0/version_0 --class_name dog --placeholder_token sks

IS and DINO-IS use the images of the base prompt "a photo of {0}"; TS uses every other prompt, with {0}
replaced by the class name alone (the placeholder token means nothing to CLIP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from .conditioning import BASE_PROMPT
from .generation import existing_images
from .metrics import DEFAULT_CLIP, DEFAULT_DINO, Embedders, load_rgb, mean_cosine, reference_images

TS_TEXT = "prompt with {0} replaced by the class name alone"


def prompt_folders(samples: Path, placeholder_token: str) -> dict[str, Path]:
    """Prompt template -> folder, from prompts.yaml when present, else from the folder names."""
    record_path = samples / "prompts.yaml"
    record = yaml.safe_load(record_path.read_text()) if record_path.is_file() else {}
    folders = {}
    for folder in sorted(p for p in samples.iterdir() if p.is_dir() and existing_images(p)):
        entry = record.get(folder.name) or {}
        template = entry.get("prompt") or " ".join("{0}" if w == placeholder_token else w for w in folder.name.split())
        folders[template] = folder
    return folders


def evaluate_samples(
    embedders: Embedders,
    references: list,
    samples: str | Path,
    class_name: str,
    placeholder_token: str,
    groups: dict[str, list[str]] | None = None,
) -> dict:
    """Metrics of one samples folder; `groups` (name -> templates) adds a TS per group (e.g. contextual)."""
    folders = prompt_folders(Path(samples), placeholder_token)
    if not folders:
        raise ValueError(f"no prompt folders with images in {samples}")
    base = folders.get(BASE_PROMPT)
    is_images = [load_rgb(p) for p in existing_images(base)] if base else []
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
        per_prompt[template] = mean_cosine(text, embedders.clip_images([load_rgb(p) for p in existing_images(folder)]))
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="Reference image or folder of images.")
    p.add_argument("--samples", required=True, help="A version folder written by inference.py.")
    p.add_argument("--class_name", required=True)
    p.add_argument("--placeholder_token", required=True)
    p.add_argument("--mask_dir", default=None, help="Subject masks named like the reference images.")
    p.add_argument("--clip_model", default=DEFAULT_CLIP)
    p.add_argument("--dino_model", default=DEFAULT_DINO)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="JSON file (default: metrics.json in --samples).")
    args = p.parse_args(argv)
    if not Path(args.samples).is_dir():
        p.error(f"--samples: {args.samples} is not a folder; pass a version folder written by inference.py")
    embedders = Embedders.load(args.clip_model, args.dino_model, args.device, args.batch_size)
    result = evaluate_samples(embedders, reference_images(args.reference, args.mask_dir), args.samples,
                              args.class_name, args.placeholder_token)
    result |= {"clip_model": args.clip_model, "dino_model": args.dino_model, "reference": args.reference}
    output = Path(args.output or Path(args.samples) / "metrics.json")
    output.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"written: {output}")
    return result


if __name__ == "__main__":
    main()
