"""Adapters on a real (tiny) diffusers UNet: processors kept, mask from the UNet's timestep, unload."""

import torch

from tlora.families import attach
from tlora.method.injection import ADAPTER
from tlora.method.settings import TLoRASettings


def test_per_layer_rank_is_capped(unet):
    tlora = attach(unet, TLoRASettings("lora", 80, 1))  # the tiny UNet's attention layers are 64 wide
    for _, layer in tlora.layers.values():
        adapter = getattr(layer, ADAPTER)
        assert adapter.rank == min(80, layer.in_features, layer.out_features) == 64
        assert adapter.down.weight.shape == (64, layer.in_features)


def test_adapters_follow_the_seed_in_module_order(unet, tiny_sdxl):
    """Same seed, same adapters: creation order is attn_processors order, q, k, v, out."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    first = attach(unet, TLoRASettings("ortho_lora", 4, 1)).state_dict()
    other = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(0)
    second = attach(other, TLoRASettings("ortho_lora", 4, 1)).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    order = [k.rsplit(".processor", 1)[0] for k in first if k.endswith("to_q_lora.q_layer.weight")]
    assert order == [k.rsplit(".processor", 1)[0] for k in unet.attn_processors]


def test_the_method_attaches_to_any_denoiser_it_is_told_about():
    """No model family involved: a DenoiserSpec names the Linear, the timestep argument and its scale."""
    from torch import nn

    from tlora.method.denoiser import DenoiserSpec, Layer
    from tlora.method.injection import attach as attach_described

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])

        def forward(self, x, sigma):
            return self.blocks[0](x)

    toy, settings = Toy(), TLoRASettings("lora", 4, 1, rank_rule="divide_first")
    spec = DenoiserSpec((Layer("blocks.0.proj_lora", "blocks.0"),), ("sigma", 1), lambda sigma: sigma * 1000)
    tl = attach_described(toy, settings, spec)
    assert list(tl.adapters) == ["blocks.0.proj_lora"]
    for sigma in (0.0, 0.5, 0.999):
        toy(torch.randn(2, 8), torch.tensor(sigma))
        assert int(tl.state.mask.sum()) == int(settings.active_rank(torch.tensor(sigma * 1000)))
    assert tl.unload() is toy and not hasattr(toy.blocks[0], ADAPTER)
