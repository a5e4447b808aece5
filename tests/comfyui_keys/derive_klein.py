"""The LoRA keys ComfyUI maps to FLUX.2 [klein] 4B's attention weights (writes klein.json beside it).

The ComfyUI snapshot these fixtures follow (Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832,
2025-10-12) predates FLUX.2: it has no FLUX.2 model. This applies its FLUX rules (derive_flux.py: comfy/lora.py
model_lora_keys_unet for comfy.model_base.Flux, comfy/utils.py flux_to_diffusers) to FLUX.2's layout, which
keeps BFL's FLUX.1 names for the attention (double_blocks.{i}.img_attn.qkv / .proj, txt_attn.qkv / .proj,
single_blocks.{j}.linear1 / linear2) with klein 4B's counts (5 double, 20 single blocks, hidden 24 x 128 = 3072)
and FLUX.2's single-block MLP, gated (SwiGLU): linear1 has 3 x hidden rows for q, k, v, then 2 x mlp_ratio x
hidden for the MLP (diffusers' Flux2ParallelSelfAttention.to_qkv_mlp_proj, transformer_flux2.py:768-769:
inner_dim * 3 + mlp_hidden_dim * mlp_mult_factor, mlp_mult_factor 2). The slices ComfyUI addresses (q, k, v at
rows 0, hidden, 2 x hidden; linear1_qkv the first 3 x hidden rows) are the same in FLUX.2.
The diffusers keys are those of this snapshot's FLUX.1 map (FLUX.1 names such as
single_transformer_blocks.{j}.attn.to_q, mapped to linear1's rows); FLUX.2's own diffusers names
(to_qkv_mlp_proj, a single block's attn.to_out) are not in it.
Run: python tests/comfyui_keys/derive_klein.py
"""

from __future__ import annotations

from derive_flux import SOURCE, comfy_config, fixture, write

MODEL = "black-forest-labs/FLUX.2-klein-base-4B"
KLEIN_SOURCE = (f"{SOURCE}, FLUX rules (comfy.model_base.Flux, comfy/utils.py flux_to_diffusers) on FLUX.2 [klein] "
                "4B's layout: this snapshot predates FLUX.2")


def main() -> None:
    from tlora.families.klein import PUBLISHED

    published = PUBLISHED["klein-4b"]["transformer"][2]
    config = comfy_config(published)
    assert config == {"depth": 5, "depth_single_blocks": 20, "hidden_size": 3072}, config
    hidden = config["hidden_size"]
    linear1_rows = 3 * hidden + 2 * int(hidden * published["mlp_ratio"])  # q, k, v; SwiGLU gate and value
    write("klein", fixture(config, linear1_rows, KLEIN_SOURCE, MODEL))


if __name__ == "__main__":
    main()
