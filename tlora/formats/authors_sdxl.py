"""The authors' SDXL files: `pytorch_lora_weights.safetensors` with our keys (`<attention>.processor.to_q_lora...`,
both trainer types), and a hparams.yml whose keys are ours without `family` (tlora.runs.hparams reads them)."""

from __future__ import annotations

from typing import Any

import torch

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINER_TYPES = ("lora", "ortho_lora")  # what their code trains
HAS_ALPHA = True  # their r(t) has alpha_rank_scale


def hparams(values: dict[str, Any], where: str) -> dict[str, Any] | None:
    """Their hparams.yml has our key set: nothing of its own to read (None)."""
    return None


def run_keys(settings) -> dict[str, Any]:
    """Keys our hparams.yml adds for their tools: none, they read ours."""
    return {}


def unused(prefix: str) -> bool:
    """Whether their file holds an adapter that their code never uses: none do."""
    return False


def weights(adapters: dict[str, dict[str, torch.Tensor]], down: str, up: str) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's adapters (key prefix -> parameters) as their code writes them: as they are."""
    return dict(adapters)
