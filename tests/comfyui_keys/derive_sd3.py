"""The LoRA keys ComfyUI maps to Stable Diffusion 3.5 Medium's attention weights (writes sd3.json beside it).

A pure-Python re-statement of ComfyUI's rules at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
(no ComfyUI import): `comfy/lora.py` model_lora_keys_unet (lines 179-186 for every model, 210-225 for
comfy.model_base.SD3), the diffusers -> ComfyUI map it uses, `comfy/utils.py` mmdit_to_diffusers (lines 383-425)
with MMDIT_MAP_BLOCK (lines 356-381), and the model's own layout (`comfy/ldm/modules/diffusionmodules/mmdit.py`).
unet_to_diffusers (lora.py:188) gives nothing for SD3: its unet_config has no num_res_blocks (utils.py:266-267).
SD3.5 Medium is the published model with every kind of attention layer (attn2 in its first 13 blocks); Large
has the same names without attn2, in 38 blocks.
Run: python tests/comfyui_keys/derive_sd3.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "stabilityai/stable-diffusion-3.5-medium"


def comfy_config(published: dict) -> dict:
    """ComfyUI's unet_config for an SD3 transformer (comfy/model_detection.py:40-79): depth = the x_embedder's
    width / 64 (line 49: the width is 64 x depth in every MMDiT), x_block_self_attn_layers = the blocks with an
    `x_block.attn2.qkv` (lines 74-78)."""
    hidden = published["num_attention_heads"] * published["attention_head_dim"]
    return {"depth": hidden // 64, "x_block_self_attn_layers": list(published.get("dual_attention_layers", []))}


def attention_weights(config: dict) -> dict[str, int]:
    """ComfyUI's attention Linear weights (keys under `diffusion_model.`) -> their rows. mmdit.py: every JointBlock
    (line 649) has a context_block and an x_block (lines 661-662), each with attn = SelfAttention (line 417): qkv of
    3 x hidden rows (line 279) and proj of hidden rows (line 281), but for a pre_only block, which has no proj
    (line 280): the last block's context_block (line 868); an x_block in x_block_self_attn_layers also has attn2
    (lines 429-438, line 873)."""
    hidden, depth, out = 64 * config["depth"], config["depth"], {}
    for i in range(depth):
        block = f"diffusion_model.joint_blocks.{i}"
        attentions = [("x_block.attn", False), ("context_block.attn", i == depth - 1)]
        if i in config["x_block_self_attn_layers"]:
            attentions.append(("x_block.attn2", False))
        for attn, pre_only in attentions:
            out[f"{block}.{attn}.qkv.weight"] = 3 * hidden
            if not pre_only:
                out[f"{block}.{attn}.proj.weight"] = hidden
    return out


def mmdit_to_diffusers(config: dict) -> dict[str, str | tuple[str, tuple[int, int, int]]]:
    """comfy/utils.py:383-425 for the attention weights, with output_prefix "diffusion_model." (lora.py:211):
    diffusers key -> ComfyUI key, or (key, (dim, start, length)) for a slice of a fused qkv. Every block gets every
    name (lines 388-413), attn2 and the last block's to_add_out included; left out: the norms (ln_q, ln_k), the
    modulations, the MLPs and embedders (MMDIT_MAP_BLOCK's other entries, MMDIT_MAP_BASIC)."""
    offset, out = config["depth"] * 64, {}  # utils.py:392
    for i in range(config["depth"]):
        attn, to = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for prefix, names, qkv in (("attn", ("to_q", "to_k", "to_v"), "x_block.attn.qkv"),  # utils.py:395-399
                                   ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "context_block.attn.qkv"),
                                   ("attn2", ("to_q", "to_k", "to_v"), "x_block.attn2.qkv")):  # utils.py:406-410
            for j, name in enumerate(names):
                out[f"{attn}.{prefix}.{name}.weight"] = (f"{to}.{qkv}.weight", (0, j * offset, offset))
        out[f"{attn}.attn.to_add_out.weight"] = f"{to}.context_block.attn.proj.weight"  # utils.py:360
        out[f"{attn}.attn.to_out.0.weight"] = f"{to}.x_block.attn.proj.weight"  # utils.py:370
        out[f"{attn}.attn2.to_out.0.weight"] = f"{to}.x_block.attn2.proj.weight"  # utils.py:374
    return out


def key_map(config: dict) -> tuple[dict[str, str | tuple], dict[str, int]]:
    """comfy/lora.py model_lora_keys_unet for these weights: (LoRA key prefix -> ComfyUI weight or (weight,
    slice), ComfyUI weight -> rows). A diffusers name whose weight this model lacks (attn2 of a block without it,
    the last block's to_add_out) is mapped by ComfyUI but patches nothing: left out."""
    weights = attention_weights(config)
    keys: dict[str, str | tuple] = {}
    for k in weights:  # lora.py:179-184: kohya keys of ComfyUI's own (SAI's) layout and the generic ones
        keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        keys[k[:-len(".weight")]] = k
    for k, to in mmdit_to_diffusers(config).items():  # lora.py:210-225
        if (to[0] if isinstance(to, tuple) else to) not in weights:
            continue
        name = k[:-len(".weight")]
        keys[f"transformer.{name}"] = to  # regular diffusers SD3 LoRAs
        keys[f"base_model.model.{name}"] = to  # flash-sd3 and others
        keys[f"lora_transformer_{name.replace('.', '_')}"] = to  # OneTrainer
        keys[f"lycoris_{name.replace('.', '_')}"] = to  # SimpleTuner's LyCORIS
    return keys, weights


def fixture(config: dict, source: str, model: str) -> dict:
    """The fixture: the keys, the slices ({key: [dim, start, length]}) and, for keys that map a whole fused weight
    (one ComfyUI also addresses by slices), its rows."""
    keys, weights = key_map(config)
    fused = {to[0] for to in keys.values() if isinstance(to, tuple)}
    return {"source": source, "model": model, "keys": sorted(keys),
            "slices": {k: list(to[1]) for k, to in sorted(keys.items()) if isinstance(to, tuple)},
            "rows": {k: weights[to] for k, to in sorted(keys.items()) if isinstance(to, str) and to in fused}}


def write(name: str, data: dict) -> None:
    out = Path(__file__).with_name(f"{name}.json")
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{out}: {len(data['keys'])} keys, {len(data['slices'])} slices")


def main() -> None:
    from tlora.families.sd3 import PUBLISHED

    config = comfy_config(PUBLISHED["sd3.5-medium"]["transformer"][2])
    assert config == {"depth": 24, "x_block_self_attn_layers": list(range(13))}, config
    write("sd3", fixture(config, SOURCE, MODEL))


if __name__ == "__main__":
    main()
