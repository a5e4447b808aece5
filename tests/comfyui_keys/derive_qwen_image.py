"""The LoRA keys ComfyUI maps to Qwen-Image's attention weights (writes qwen_image.json beside it).

A pure-Python re-statement of ComfyUI's rules at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
(2025-10-12; no ComfyUI import). ComfyUI loads Qwen-Image as comfy.supported_models.QwenImage
(supported_models.py:1306) -> comfy.model_base.QwenImage (model_base.py:1446-1448) around
comfy.ldm.qwen_image.model.QwenImageTransformer2DModel, whose state dict is under `diffusion_model.`
(model_base.py:140); model_detection.py:544-549 counts its blocks (num_layers) from the checkpoint. Its module
paths are diffusers': `transformer_blocks` (qwen_image/model.py:326), each block's `attn` (:207), an Attention with
the Linears to_q, to_k, to_v (:112-114), add_q_proj, add_k_proj, add_v_proj (:117-119), to_out.0 (:122-123) and
to_add_out (:126), and RMSNorms norm_q, norm_k, norm_added_q, norm_added_k (:106-109), which are no projections.
comfy/lora.py model_lora_keys_unet maps, for every `diffusion_model.<path>.weight`: `lora_unet_<path with _>` and
`diffusion_model.<path>` (lora.py:179-184, every model), and `<path>`, `transformer.<path>` and
`lycoris_<path with _>` (lora.py:306-314, comfy.model_base.QwenImage). unet_to_diffusers (lora.py:188) gives
nothing: the unet_config has no num_res_blocks (utils.py:265-267). No weight is fused, so there are no slices.
Kept here: those keys for the eight attention projections of the published 60 blocks.
Run: python tests/comfyui_keys/derive_qwen_image.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "Qwen/Qwen-Image"
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")


def state_dict_weights(blocks: int) -> list[str]:
    """The attention projections' weight keys of ComfyUI's QwenImage state dict."""
    return [f"diffusion_model.transformer_blocks.{i}.attn.{proj}.weight" for i in range(blocks) for proj in PROJECTIONS]


def lora_keys(weight: str) -> list[str]:
    """The LoRA key prefixes comfy/lora.py maps to one `diffusion_model.*.weight`."""
    path = weight[len("diffusion_model."):-len(".weight")]
    generic = [f"lora_unet_{path.replace('.', '_')}", weight[:-len(".weight")]]  # lora.py:182-184
    qwen = [path, f"transformer.{path}", f"lycoris_{path.replace('.', '_')}"]  # lora.py:311-314
    return generic + qwen


def main() -> None:
    from tlora.families.qwen_image import PUBLISHED

    blocks = PUBLISHED["qwen-image"]["transformer"][2]["num_layers"]
    assert blocks == 60, blocks  # QwenImageTransformer2DModel's num_layers (qwen_image/model.py:292)
    keys = sorted(key for weight in state_dict_weights(blocks) for key in lora_keys(weight))
    out = Path(__file__).with_name("qwen_image.json")
    out.write_text(json.dumps({"source": SOURCE, "model": MODEL, "keys": keys}, indent=1) + "\n")
    print(f"{out}: {len(keys)} keys")


if __name__ == "__main__":
    main()
