"""kohya-style LoRA files, as ComfyUI's LoraLoader, A1111/Forge and diffusers load them: one layer of the model's
original checkpoint per key, `lora_unet_<its path with _>` (`lora_unet_double_blocks_0_img_attn_qkv`), with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` (= rank: strength 1 is the update as exported), and kohya's
metadata. The family recipe says which original layers hold its projections (Family.original_layers)."""

from __future__ import annotations

import torch

from tlora.families.base import Family, Target

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (down, up)


def key(original: str) -> str:
    """The kohya key of an original layer path (`double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_...`)."""
    return "lora_unet_" + original.replace(".", "_")


def layers(family: type[Family], widths: dict[str, int], meta: dict[str, str]) -> list[Target]:
    """The file's layers for the projections in `widths`: the family's original layers under their kohya keys."""
    return [Target(key(t.name), t.out_features, t.parts) for t in family.original_layers(widths, meta)]


def tensors(factors: Factors) -> dict[str, torch.Tensor]:
    """`<key>.lora_down.weight` / `.lora_up.weight` / `.alpha` for factors named by kohya keys."""
    out = {}
    for name, (down, up) in factors.items():
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def metadata(family: type[Family]) -> dict[str, str]:
    """kohya's file metadata: a LoRA of networks.lora, on the family's base model."""
    return {"ss_network_module": "networks.lora", "ss_base_model_version": family.kohya_base_model}
