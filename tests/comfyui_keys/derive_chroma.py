"""The LoRA keys ComfyUI maps to Chroma1-HD's attention weights (writes chroma.json beside it).

ComfyUI's Chroma is a Flux (`comfy/model_base.py:1381`, `class Chroma(Flux)`), so `comfy/lora.py`
model_lora_keys_unet maps its keys by FLUX's rules (lines 179-186 for every model, 255-266 for
comfy.model_base.Flux, with `comfy/utils.py` flux_to_diffusers): derive_flux.py re-states them, this applies them
to Chroma's layout at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832. Chroma's blocks hold the same
attention weights as FLUX's (`comfy/ldm/chroma/layers.py:59, :69` the double blocks' img_attn / txt_attn, FLUX's
SelfAttention with qkv and proj; `:140, :142` the single blocks' linear1 and linear2), and no modulation layers
(an approximator makes them), which are no attention weights anyway.
Run: python tests/comfyui_keys/derive_chroma.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from derive_flux import SOURCE, comfy_config, fixture, write  # noqa: E402

MODEL = "lodestones/Chroma1-HD"


def main() -> None:
    from tlora.families.chroma import MLP_RATIO, PUBLISHED

    config = comfy_config(PUBLISHED["chroma1-hd"]["transformer"][2])
    # model_detection.py:177-206: the same branch as FLUX (hidden_size 3072, mlp_ratio 4, blocks counted), Chroma
    # told by its distilled_guidance_layer (:199)
    assert config == {"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072}, config
    hidden = config["hidden_size"]
    assert MLP_RATIO == 4.0  # chroma/layers.py:138-140: linear1 = 3 x hidden + mlp_ratio x hidden rows
    write("chroma", fixture(config, 3 * hidden + int(hidden * MLP_RATIO), SOURCE, MODEL))


if __name__ == "__main__":
    main()
