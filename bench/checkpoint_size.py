"""Disk cost of one checkpoint on SDXL's real architecture: the weights file and the resume state.

    python bench/checkpoint_size.py [--rank 64]

Builds the UNet on the meta device (no memory, no download), attaches the adapters and counts bytes:
weights = every adapter tensor in float32 (ortho_lora also stores its frozen start P0, L0, Q0); resume
state = AdamW's two float32 moments per trainable value plus one step counter per tensor (accelerate's
optimizer.bin), a few KB of RNG states and the data order.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel
from sdxl_architecture import UNET

import tlora  # noqa: F401  (first: quiets transformers' torchvision notice)
from tlora.families import attach
from tlora.method.settings import TLoRASettings


def sizes(trainer_type: str, rank: int) -> tuple[int, int, int]:
    """(weights bytes, optimizer-state bytes, trainable values) for SDXL with `rank` adapters."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        adapters = attach(unet, TLoRASettings(trainer_type, rank), init=False)
    weights = sum(t.numel() * 4 for a in adapters.adapters.values() for t in a.state_dict().values())
    trainable = adapters.trainable_parameters()
    values = sum(p.numel() for p in trainable)
    return weights, 2 * 4 * values + 4 * len(trainable), values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--rank", type=int, default=64)
    rank = p.parse_args().rank
    print("| trainer_type | rank | trainable values | pytorch_lora_weights.safetensors | resume/ (optimizer.bin) | total |")
    print("|---|---|---|---|---|---|")
    for trainer_type in ("ortho_lora", "lora"):
        weights, state, values = sizes(trainer_type, rank)
        mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
        print(f"| {trainer_type} | {rank} | {values / 1e6:.1f} M | {mb(weights)} | {mb(state)} | {mb(weights + state)} |")


if __name__ == "__main__":
    main()
