"""The LoRA keys ComfyUI maps to Z-Image's attention weights, for the published transformer (writes zimage.json).

This ComfyUI snapshot (Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832, 2025-10-12) predates Z-Image;
ComfyUI runs Z-Image with its Lumina 2 model, NextDiT (`comfy/ldm/lumina/model.py`; `comfy/model_base.py`
Lumina2, `comfy/supported_models.py` Lumina2), so the keys are that model's module names at Z-Image's block counts.
A pure-Python re-statement of ComfyUI's rules (no ComfyUI import):
- `comfy/ldm/lumina/model.py`: JointAttention (line 25) computes q, k, v in one Linear `qkv` (line 52) of
  (n_heads + 2 n_kv_heads) * head_dim rows and projects back with `out` (line 59); NextDiT (line 361) has
  `noise_refiner` and `context_refiner` (lines 402, 419: n_refiner_layers each) and `layers` (line 449: n_layers)
  of JointTransformerBlock, whose attention is `attention` (line 238);
- `comfy/lora.py` model_lora_keys_unet, lines 179-186: every `diffusion_model.<path>.weight` of the model is
  mapped from `lora_unet_<path with _>` (kohya) and from `diffusion_model.<path>` (the generic format); no
  Lumina2 branch adds diffusers names, and `comfy/utils.py` unet_to_diffusers (line 265) maps nothing for a DiT
  (no num_res_blocks).
Run: python tests/comfyui_keys/derive_zimage.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = ("Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet "
          "(Z-Image postdates it: its Lumina2 NextDiT, comfy/ldm/lumina/model.py, at Z-Image's block counts)")
MODEL = "Tongyi-MAI/Z-Image-Turbo"
ATTENTION = ("qkv", "out")  # comfy/ldm/lumina/model.py:52 and :59, JointAttention's two Linears


def state_dict_attention(n_layers: int, n_refiner_layers: int) -> list[str]:
    """The attention weights of NextDiT (the model's keys under `diffusion_model.`, comfy/model_base.py:140)."""
    groups = {"noise_refiner": n_refiner_layers, "context_refiner": n_refiner_layers, "layers": n_layers}
    return [f"diffusion_model.{group}.{i}.attention.{w}.weight"
            for group, count in groups.items() for i in range(count) for w in ATTENTION]


def key_map(weights: list[str]) -> dict[str, str]:
    """comfy/lora.py:179-184 for these weights: LoRA key prefix -> ComfyUI weight."""
    keys = {}
    for k in weights:
        keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        keys[k[:-len(".weight")]] = k
    return keys


def main() -> None:
    from tlora.families.zimage import PUBLISHED

    config = PUBLISHED["z-image-turbo"]["transformer"][2]
    weights = state_dict_attention(config["n_layers"], config["n_refiner_layers"])
    fixture = {"source": SOURCE, "model": MODEL, "keys": sorted(key_map(weights)), "slices": {}}
    out = Path(__file__).with_name("zimage.json")
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{out}: {len(fixture['keys'])} keys")


if __name__ == "__main__":
    main()
