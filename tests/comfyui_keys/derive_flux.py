"""The LoRA keys ComfyUI maps to FLUX.1-dev's attention weights (writes flux.json beside it).

A pure-Python re-statement of ComfyUI's rules at Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
(no ComfyUI import): `comfy/lora.py` model_lora_keys_unet (lines 179-186 for every model, 255-266 for
comfy.model_base.Flux), the diffusers -> ComfyUI map it uses, `comfy/utils.py` flux_to_diffusers (lines 568-671),
and the model's own layout (`comfy/ldm/flux/layers.py`, `comfy/ldm/flux/model.py`).
unet_to_diffusers (lora.py:188) gives nothing for FLUX: its unet_config has no num_res_blocks (utils.py:266-267).
Run: python tests/comfyui_keys/derive_flux.py
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py model_lora_keys_unet"
MODEL = "black-forest-labs/FLUX.1-dev"
DOUBLE = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")  # layers.py:88, :90 via :141, :152
SINGLE = ("linear1", "linear2")  # layers.py:235 (q, k, v and the MLP input), :237 (attention and MLP output)


def comfy_config(published: dict) -> dict:
    """ComfyUI's unet_config for a FLUX transformer (model_detection.py:177-216): depth and depth_single_blocks
    counted from the checkpoint's blocks, hidden_size 3072 (heads x head width), mlp_ratio 4."""
    return {"depth": published["num_layers"], "depth_single_blocks": published["num_single_layers"],
            "hidden_size": published["num_attention_heads"] * published["attention_head_dim"]}


def attention_weights(config: dict, linear1_rows: int) -> dict[str, int]:
    """ComfyUI's attention weights (keys under `diffusion_model.`, model_base.py:140) -> their rows: every double
    block's image and text attention qkv (3 x hidden rows) and proj (model.py:69-78, layers.py:141, :152), every
    single block's linear1 (q, k, v then the MLP's input rows) and linear2 (model.py:82-86, layers.py:235-237)."""
    hidden = config["hidden_size"]
    rows = {"img_attn.qkv": 3 * hidden, "txt_attn.qkv": 3 * hidden, "img_attn.proj": hidden, "txt_attn.proj": hidden,
            "linear1": linear1_rows, "linear2": hidden}
    return {f"diffusion_model.{kind}_blocks.{i}.{w}.weight": rows[w]
            for kind, count, names in (("double", config["depth"], DOUBLE), ("single", config["depth_single_blocks"],
                                                                              SINGLE))
            for i in range(count) for w in names}


def flux_to_diffusers(config: dict) -> dict[str, str | tuple[str, tuple[int, int, int]]]:
    """comfy/utils.py:568-671 for the attention weights: diffusers key -> ComfyUI key, or (key, (dim, start, length))
    for a slice of a fused one. Left out: the single blocks' proj_mlp (utils.py:627, the MLP's rows of linear1),
    the norms, modulations, MLPs and embedders."""
    hidden, out = config["hidden_size"], {}
    for i in range(config["depth"]):  # utils.py:574-615
        attn, to = f"transformer_blocks.{i}.attn", f"diffusion_model.double_blocks.{i}"
        for names, qkv in ((("to_q", "to_k", "to_v"), "img_attn.qkv"),
                           (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn.qkv")):
            for j, name in enumerate(names):  # utils.py:578-589
                out[f"{attn}.{name}.weight"] = (f"{to}.{qkv}.weight", (0, j * hidden, hidden))
        out[f"{attn}.to_out.0.weight"] = f"{to}.img_attn.proj.weight"  # utils.py:592
        out[f"{attn}.to_add_out.weight"] = f"{to}.txt_attn.proj.weight"  # utils.py:598
    for i in range(config["depth_single_blocks"]):  # utils.py:617-639
        block, to = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for j, name in enumerate(("to_q", "to_k", "to_v")):  # utils.py:621-626
            out[f"{block}.attn.{name}.weight"] = (f"{to}.linear1.weight", (0, j * hidden, hidden))
        out[f"{block}.proj_out.weight"] = f"{to}.linear2.weight"  # utils.py:632
    return out


def key_map(config: dict, linear1_rows: int) -> tuple[dict[str, str | tuple], dict[str, int]]:
    """comfy/lora.py model_lora_keys_unet for these weights: (LoRA key prefix -> ComfyUI weight or (weight,
    slice), ComfyUI weight -> rows)."""
    weights = attention_weights(config, linear1_rows)
    keys: dict[str, str | tuple] = {}
    for k in weights:  # lora.py:179-184: kohya keys of ComfyUI's own (BFL's) layout and the generic ones
        keys["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
        keys[k[:-len(".weight")]] = k
    for k, to in flux_to_diffusers(config).items():  # lora.py:256-262
        assert (to[0] if isinstance(to, tuple) else to) in weights, to
        name = k[:-len(".weight")]
        keys[f"transformer.{name}"] = to  # diffusers (and SimpleTuner)
        keys[f"lycoris_{name.replace('.', '_')}"] = to  # SimpleTuner's LyCORIS
        keys[f"lora_transformer_{name.replace('.', '_')}"] = to  # OneTrainer
    for k in weights:  # lora.py:263-266: q, k, v of a single block's linear1 by one key
        if ".linear1." in k:
            keys[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, config["hidden_size"] * 3))
    return keys, weights


def fixture(config: dict, linear1_rows: int, source: str, model: str) -> dict:
    """The fixture: the keys, the slices ({key: [dim, start, length]}) and, for keys that map a whole fused weight
    (one ComfyUI also addresses by slices), its rows."""
    keys, weights = key_map(config, linear1_rows)
    fused = {to[0] for to in keys.values() if isinstance(to, tuple)}
    return {"source": source, "model": model, "keys": sorted(keys),
            "slices": {k: list(to[1]) for k, to in sorted(keys.items()) if isinstance(to, tuple)},
            "rows": {k: weights[to] for k, to in sorted(keys.items()) if isinstance(to, str) and to in fused}}


def write(name: str, data: dict) -> None:
    out = Path(__file__).with_name(f"{name}.json")
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{out}: {len(data['keys'])} keys, {len(data['slices'])} slices")


def main() -> None:
    from tlora.families.flux import MLP_RATIO, PUBLISHED

    config = comfy_config(PUBLISHED["flux-dev"]["transformer"][2])
    assert config == {"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072}, config  # model_detection.py:191
    hidden = config["hidden_size"]
    assert MLP_RATIO == 4.0  # model_detection.py:192; layers.py:233-235: linear1 = 3 x hidden + mlp_ratio x hidden
    write("flux", fixture(config, 3 * hidden + int(hidden * MLP_RATIO), SOURCE, MODEL))


if __name__ == "__main__":
    main()
