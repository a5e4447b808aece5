"""The LoRA file a family pipeline's own `save_lora_weights` writes: peft-layout tensors
(`<module>.lora_A.weight` / `.lora_B.weight`) under the denoiser's prefix (`unet.`, `transformer.`) and the adapter
metadata, rank and alpha per module from diffusers' own get_peft_kwargs (alpha = rank: scale 1). The family recipe
says which of its denoiser's layers hold its projections (Family.diffusers_layers)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

from tlora.families.base import Family, Target

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (down, up)


def layers(family: type[Family], widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
    """The file's layers for the projections in `widths`: the family's diffusers layers, by module path."""
    return family.diffusers_layers(widths, meta)


def tensors_and_config(factors: Factors) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-layout tensors and the adapter metadata diffusers writes."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    ranks = {f"{name}.lora_B.weight": down.shape[0] for name, (down, _) in factors.items()}
    config = LoraConfig(**get_peft_kwargs(ranks, None, tensors)).to_dict()
    return tensors, {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save(factors: Factors, family: type[Family], out: Path) -> None:
    """Write the file with the family pipeline's save_lora_weights, renamed into place when complete."""
    tensors, metadata = tensors_and_config(factors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")  # diffusers writes in place: rename when complete
    try:
        family.pipeline_class.save_lora_weights(out.parent, weight_name=tmp.name, **{
            f"{family.model_attr}_lora_layers": tensors, f"{family.model_attr}_lora_adapter_metadata": metadata})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
