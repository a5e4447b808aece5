"""The LoRA keys ComfyUI maps to Stable Diffusion 1.5's attention weights, for the published UNet (writes sd15.json
beside it).

A pure-Python re-statement of ComfyUI's rules at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
(no ComfyUI import): `comfy/lora.py` model_lora_keys_unet (lines 175-201), the diffusers -> ComfyUI map it uses
for a UNet, `comfy/utils.py` unet_to_diffusers (lines 265-329), and the UNet's own module layout
(`comfy/ldm/modules/diffusionmodules/openaimodel.py` UNetModel, `comfy/ldm/modules/attention.py`). ComfyUI's
model class for it is `comfy/supported_models.py` SD15 (line 30); its block counts are those of the SD15 table in
`comfy/model_detection.py` (lines 826-829).
Run: python tests/comfyui_keys/derive_sd15.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from derive_sdxl import key_map, state_dict_attention, unet_to_diffusers  # noqa: E402, F401  (ComfyUI's UNet rules)

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# comfy/ldm/modules/attention.py:685-689: CrossAttention's to_q, to_k, to_v and to_out (Sequential(Linear, Dropout));
# every BasicTransformerBlock has attn1 (self) and attn2 (cross)
ATTENTION = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
# comfy/model_detection.py:826-829, the unet_config ComfyUI uses for SD 1.5 (the block counts of this table)
COMFY_SD15 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}


def unet_config(published: dict) -> dict:
    """ComfyUI's unet_config for a diffusers UNet config, counted as comfy/model_detection.py:763-788 counts a
    diffusers UNet (transformer_depth per down resnet; one transformer block per attention unless the config says
    otherwise) and as its SD15 table (model_detection.py:826-829) gives the output and middle depths (each up block
    has one attention more than its down block)."""
    levels, per_block = len(published["block_out_channels"]), published["layers_per_block"]
    depth = published.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    attends = ["CrossAttn" in kind for kind in published["down_block_types"]]
    return {
        "num_res_blocks": [per_block] * levels,
        "channel_mult": [c // published["block_out_channels"][0] for c in published["block_out_channels"]],
        "transformer_depth": [d if a else 0 for a, d in zip(attends, depth) for _ in range(per_block)],
        "transformer_depth_output": [d if a else 0 for a, d in zip(attends, depth) for _ in range(per_block + 1)],
        "transformer_depth_middle": depth[-1],
    }


def main() -> None:
    from tlora.families.sd15 import PUBLISHED

    config = unet_config(PUBLISHED["sd15"]["unet"][2])
    assert config == COMFY_SD15, config  # tlora's published config is the SD 1.5 ComfyUI knows
    fixture = {"source": SOURCE, "model": MODEL, "keys": sorted(key_map(config)), "slices": {}}
    out = Path(__file__).with_name("sd15.json")
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{out}: {len(fixture['keys'])} keys")


if __name__ == "__main__":
    main()
