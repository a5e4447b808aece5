"""CPU demo: build the tiny random SDXL and train a few T-LoRA steps on it, no GPU, no hub.

    python -m tlora.demo [--output_dir demo_runs] [--steps 10]

The tiny model is kept in `<output_dir>/tiny-sdxl` (the run's hparams.yml points at it, so inference.py
and analyze work on the run afterwards). Trains on dog_example/ when its photos were downloaded, else on
a generated image (`<output_dir>/generated_concept/`); prints the run folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tlora.common.commands import run_command
from tlora.common.flags import Parser
from tlora.common.images import list_images
from tlora.common.values import check_count

REPO = Path(__file__).resolve().parents[1]


def training_folder(output_dir: Path) -> Path:
    dogs = REPO / "dog_example"
    if dogs.is_dir() and list_images(dogs):
        return dogs
    folder = output_dir / "generated_concept"
    if not (folder / "00.png").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:256, 0:256] / 255.0
        image = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=-1)
        Image.fromarray((image * 255).astype("uint8")).save(folder / "00.png")
    return folder


def tiny_model(output_dir: Path) -> Path:
    """The demo's tiny SDXL in output_dir (built once, then reused)."""
    from tlora.families.tiny_models import BUILDERS

    folder = output_dir / "tiny-sdxl"
    if not (folder / "model_index.json").is_file():
        BUILDERS["sdxl"](folder)
    return folder


def demo(output_dir: str | Path, steps: int) -> Path:
    """Train `steps` T-LoRA steps on the tiny model; returns the run folder."""
    from tlora.train.options import parse_args
    from tlora.train.trainer import train

    output_dir = Path(output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    model, data = tiny_model(output_dir), training_folder(output_dir)
    args = parse_args([
        "--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora", "--pretrained_model_name_or_path",
        str(model), "--pretrained_vae_model_name_or_path", "none", "--train_data_dir", str(data),
        "--output_dir", str(output_dir), "--class_name", "dog", "--placeholder_token", "sks",
        "--resolution", "64", "--lora_rank", "8", "--min_rank", "4", "--num_train_epochs", str(steps),
        "--checkpointing_steps", str(max(1, steps // 2)), "--dataloader_num_workers", "0",
        "--validation_prompts", "a {0} on the beach", "--num_val_imgs_per_prompt", "2",
    ] + (["--one_image", "02.jpg"] if (data / "02.jpg").is_file() else []))
    return train(args)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_runs")
    parser.add_argument("--steps", type=int, default=10)

    def parse(argv):
        opts = parser.parse_args(argv)
        check_count("--steps", opts.steps)
        return opts

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_command(parse, lambda opts: demo(opts.output_dir, opts.steps), "demo run folder", argv)


if __name__ == "__main__":
    sys.exit(main())
