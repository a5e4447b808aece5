"""The LoRA keys ComfyUI maps to SDXL's attention weights, for the published UNet (writes sdxl.json beside it).

A pure-Python re-statement of ComfyUI's rules at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
(no ComfyUI import): `comfy/lora.py` model_lora_keys_unet (lines 175-201), the diffusers -> ComfyUI map it uses
for a UNet, `comfy/utils.py` unet_to_diffusers (lines 265-329), and the UNet's own module layout
(`comfy/ldm/modules/diffusionmodules/openaimodel.py` UNetModel, `comfy/ldm/modules/attention.py`).
Run: python tests/comfyui_keys/derive_sdxl.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# comfy/ldm/modules/attention.py:685-689: CrossAttention's to_q, to_k, to_v and to_out (Sequential(Linear, Dropout));
# :725 and :739: every BasicTransformerBlock has attn1 (self) and attn2 (cross)
ATTENTION = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
# comfy/model_detection.py:796-800, the unet_config ComfyUI uses for SDXL (the block counts of this table)
COMFY_SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}


def unet_config(published: dict) -> dict:
    """ComfyUI's unet_config for a diffusers UNet config, counted as comfy/model_detection.py:763-788 counts a
    diffusers UNet (transformer_depth per down resnet) and as its SDXL table (model_detection.py:796-800) gives
    the output and middle depths (each up block has one attention more than its down block)."""
    levels = len(published["block_out_channels"])
    per_block, depth = published["layers_per_block"], published["transformer_layers_per_block"]
    attends = ["CrossAttn" in kind for kind in published["down_block_types"]]
    return {
        "num_res_blocks": [per_block] * levels,
        "channel_mult": [c // published["block_out_channels"][0] for c in published["block_out_channels"]],
        "transformer_depth": [d if a else 0 for a, d in zip(attends, depth) for _ in range(per_block)],
        "transformer_depth_output": [d if a else 0 for a, d in zip(attends, depth) for _ in range(per_block + 1)],
        "transformer_depth_middle": depth[-1],
    }


def state_dict_attention(config: dict) -> list[str]:
    """The attention weights of ComfyUI's UNetModel (the model's keys under `diffusion_model.`, model_base.py:140).
    openaimodel.py:524-530: input_blocks.0 is conv_in; :624-664: per level, per resnet one input block (resnet at .0,
    SpatialTransformer at .1 when transformer_depth.pop(0) > 0); :667-697: a downsampler block after every level but
    the last; :723-745: middle_block = resnet, transformer (.1), resnet; :748-815: output blocks, levels reversed,
    num_res_blocks + 1 each, transformer at .1 when transformer_depth_output.pop() > 0. attention.py:893: the
    SpatialTransformer's transformer_blocks.{0..depth-1}."""
    depth_in, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    blocks: list[tuple[str, int]] = []
    n = 1
    for level, res in enumerate(config["num_res_blocks"]):
        for _ in range(res):
            blocks.append((f"input_blocks.{n}.1", depth_in.pop(0)))
            n += 1
        n += level != len(config["num_res_blocks"]) - 1  # the downsampler's block
    blocks.append(("middle_block.1", config["transformer_depth_middle"]))
    n = 0
    for res in reversed(config["num_res_blocks"]):
        for _ in range(res + 1):
            blocks.append((f"output_blocks.{n}.1", depth_out.pop()))
            n += 1
    return [f"diffusion_model.{block}.transformer_blocks.{t}.{w}.weight"
            for block, depth in blocks for t in range(depth) for w in ATTENTION]


def unet_to_diffusers(config: dict) -> dict[str, str]:
    """comfy/utils.py:265-329 for the transformer blocks' attention weights (TRANSFORMER_BLOCKS, utils.py:206-227):
    diffusers key -> ComfyUI key (without `diffusion_model.`)."""
    res_blocks, depth_in = config["num_res_blocks"], list(config["transformer_depth"])
    depth_out, out = list(config["transformer_depth_output"]), {}

    def blocks(diffusers: str, comfy: str, depth: int) -> None:
        for t in range(depth):
            for w in ATTENTION:
                out[f"{diffusers}.transformer_blocks.{t}.{w}.weight"] = f"{comfy}.transformer_blocks.{t}.{w}.weight"

    for x in range(len(config["channel_mult"])):  # utils.py:277-291
        n = 1 + (res_blocks[x] + 1) * x
        for i in range(res_blocks[x]):
            blocks(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth_in.pop(0))
            n += 1
    blocks("mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"])  # utils.py:293-298
    for x, res in enumerate(reversed(res_blocks)):  # utils.py:304-324
        n = (res + 1) * x
        for i in range(res + 1):
            blocks(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth_out.pop())
            n += 1
    return out


def key_map(config: dict) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet for these weights: LoRA key prefix -> ComfyUI weight."""
    weights = state_dict_attention(config)
    keys = {}
    for k in weights:  # lora.py:179-184: kohya keys of ComfyUI's own layout and the generic ones
        keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        keys[k[:-len(".weight")]] = k
    for k, to in unet_to_diffusers(config).items():  # lora.py:188-201
        unet_key = f"diffusion_model.{to}"
        assert unet_key in weights, unet_key  # the two re-statements agree
        key_lora = k[:-len(".weight")].replace(".", "_")
        keys[f"lora_unet_{key_lora}"] = unet_key
        keys[f"lycoris_{key_lora}"] = unet_key  # SimpleTuner's LyCORIS
        for p in ("", "unet."):  # diffusers' (attention-processor) names
            diffusers_key = p + k[:-len(".weight")].replace(".to_", ".processor.to_")
            keys[diffusers_key.removesuffix(".0") if diffusers_key.endswith(".to_out.0") else diffusers_key] = unet_key
    return keys


def main() -> None:
    from tlora.families.sdxl import PUBLISHED

    config = unet_config(PUBLISHED["sdxl"]["unet"][2])
    assert config == COMFY_SDXL, config  # tlora's published config is the SDXL ComfyUI knows
    fixture = {"source": SOURCE, "model": MODEL, "keys": sorted(key_map(config)), "slices": {}}
    out = Path(__file__).with_name("sdxl.json")
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{out}: {len(fixture['keys'])} keys")


if __name__ == "__main__":
    main()
