"""The authors' FLUX files: `lora.pt` (a plain torch.save of Vanilla adapters: seven per attention processor in
their order, the single blocks' unused four included) and a hparams.yml with their run.py's keys `tlora` (the mask
or not) and `rank`; their code has only Vanilla T-LoRA and r(t) without alpha."""

from __future__ import annotations

import re
from typing import Any

import torch

from tlora.common.values import typed_value
from tlora.families.flux import IMAGE, TEXT, UNUSED_IN_SINGLE

WEIGHTS_NAME = "lora.pt"
TRAINER_TYPES = ("lora",)
HAS_ALPHA = False
ORDER = (*IMAGE.values(), *TEXT.values())  # the layers of each of their processors, in creation order
UNUSED = re.compile(r"^single_transformer_blocks\.\d+\.attn\.processor\.(" + "|".join(UNUSED_IN_SINGLE) + r")$")


def hparams(values: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The settings their hparams.yml gives (None: not their key set)."""
    if "tlora" not in values or "rank" not in values:
        return None
    known = {"family": "flux", "trainer_type": "lora", "alpha_rank_scale": 1.0,
             "timestep_dependent": typed_value(where, "tlora", values["tlora"], bool),
             "lora_rank": typed_value(where, "rank", values["rank"], int)}
    if values.get("min_rank") is not None:
        known["min_rank"] = typed_value(where, "min_rank", values["min_rank"], int)
    return known


def run_keys(settings) -> dict[str, Any]:
    """What their run_inference.py reads beside min_rank, for our hparams.yml: `tlora` and `rank`."""
    return {"tlora": settings.timestep_dependent, "rank": settings.lora_rank}


def unused(prefix: str) -> bool:
    """Whether an adapter (by key prefix) is one their code writes but never uses (skipped when reading)."""
    return UNUSED.match(prefix) is not None


def weights(adapters: dict[str, dict[str, torch.Tensor]], down: str, up: str) -> dict[str, dict[str, torch.Tensor]]:
    """Their lora.pt's adapters: seven Vanilla layers per attention processor, in their order; the single blocks'
    unused four (their strict loader wants them) as zeros of their shapes. `down` and `up` name the two parameters
    of a Vanilla adapter."""
    out = {}
    processors = {prefix.rpartition(".")[0] for prefix in adapters}  # <attention>.processor
    order = lambda p: (p.startswith("single_"), int(p.split(".")[1]))  # noqa: E731  their processors' order
    for processor in sorted(processors, key=order):
        rank, hidden = adapters[f"{processor}.{IMAGE['to_q']}"][down].shape
        for layer in ORDER:
            prefix = f"{processor}.{layer}"
            if prefix in adapters or not unused(prefix):
                out[prefix] = {name: adapters[prefix][name] for name in (down, up)}
            else:
                out[prefix] = {down: torch.zeros(rank, hidden), up: torch.zeros(hidden, rank)}
    return out
