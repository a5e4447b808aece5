"""The LoRA keys ComfyUI maps to Wan 2.1 T2V 1.3B's attention weights (writes wan.json beside it).

Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12) loads Wan 2.1 text-to-video as
comfy.supported_models.WAN21_T2V -> comfy.model_base.WAN21 (model_base.py:1098) around comfy.ldm.wan.model.WanModel,
whose state dict is under `diffusion_model.` (model_base.py:140). Each block (WanModel.__init__, model/wan/model.py
:487-490, WanAttentionBlock) has `self_attn` (WanSelfAttention, :193) and, for t2v, `cross_attn`
(WanT2VCrossAttention, :154 and :198), each with the Linears q, k, v, o (:52-55) and the RMSNorms norm_q, norm_k.
comfy/lora.py model_lora_keys_unet has no Wan branch, so only its generic rules apply (lora.py:179-186): for every
`diffusion_model.<path>.weight`, `lora_unet_<path with _>` and `diffusion_model.<path>`; unet_to_diffusers gives
nothing for a config without num_res_blocks (utils.py:265-267), so there is no diffusers-style name for Wan.
Kept here: those keys for the attention projections q, k, v, o (not the norms) of the published 30 blocks.
Run: python tests/comfyui_keys/derive_wan.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
BLOCKS = 30  # WanTransformer3DModel num_layers of the 1.3B (WanModel num_layers)
ATTENTIONS = ("self_attn", "cross_attn")  # comfy/ldm/wan/model.py WanAttentionBlock
PROJECTIONS = ("q", "k", "v", "o")  # WanSelfAttention's Linears


def state_dict_weights(blocks: int) -> list[str]:
    """The attention projections' weight keys of WAN21's state dict."""
    return [f"diffusion_model.blocks.{i}.{attention}.{proj}.weight"
            for i in range(blocks) for attention in ATTENTIONS for proj in PROJECTIONS]


def lora_keys(weight: str) -> list[str]:
    """comfy/lora.py:180-184: kohya style and the generic format, for one `diffusion_model.*.weight`."""
    path = weight[len("diffusion_model."):-len(".weight")]
    return [f"lora_unet_{path.replace('.', '_')}", weight[:-len(".weight")]]


def main() -> None:
    keys = sorted(key for weight in state_dict_weights(BLOCKS) for key in lora_keys(weight))
    out = Path(__file__).with_name("wan.json")
    out.write_text(json.dumps({"source": SOURCE, "model": MODEL, "keys": keys}, indent=1) + "\n")


if __name__ == "__main__":
    main()
