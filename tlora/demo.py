"""CPU demo: build the tiny random SDXL and train a few T-LoRA steps on it, no GPU, no hub.

    python -m tlora.demo [--output_dir demo_runs] [--steps 10]

Trains on dog_example/ when its photos were downloaded, else on a generated image; prints the run folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .data import list_images

REPO = Path(__file__).resolve().parents[1]


def training_folder(scratch: Path) -> Path:
    dogs = REPO / "dog_example"
    if dogs.is_dir() and list_images(dogs):
        return dogs
    folder = scratch / "generated_concept"
    folder.mkdir()
    y, x = np.mgrid[0:256, 0:256] / 255.0
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=-1)
    Image.fromarray((image * 255).astype("uint8")).save(folder / "00.png")
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_runs")
    parser.add_argument("--steps", type=int, default=10)
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .options import parse_args
    from .tiny import build_tiny_sdxl
    from .training import train

    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_sdxl(Path(scratch) / "tiny-sdxl")
        data = training_folder(Path(scratch))
        args = parse_args([
            "--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora", "--pretrained_model_name_or_path",
            str(model), "--pretrained_vae_model_name_or_path", "none", "--train_data_dir", str(data),
            "--output_dir", opts.output_dir, "--class_name", "dog", "--placeholder_token", "sks",
            "--resolution", "64", "--lora_rank", "8", "--min_rank", "4", "--num_train_epochs", str(opts.steps),
            "--checkpointing_steps", str(max(1, opts.steps // 2)), "--dataloader_num_workers", "0",
            "--validation_prompts", "a {0} on the beach", "--num_val_imgs_per_prompt", "2",
        ] + (["--one_image", "02.jpg"] if (data / "02.jpg").is_file() else []))
        folder = train(args)
    print(f"demo run folder: {folder}")
    return folder


if __name__ == "__main__":
    main()
