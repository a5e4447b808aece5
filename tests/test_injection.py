"""Adapters on a real (tiny) diffusers UNet: processors kept, mask from the UNet's timestep, unload."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from tlora.method.adapters import active_rank
from tlora.method.injection import ADAPTER, attach, attached
from tlora.method.settings import TLoRASettings


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        },
    }


def perturb(tlora, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tlora.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_every_projection_wrapped_and_processors_kept(unet):
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    tlora = attach(unet, TLoRASettings("ortho_lora", 4, 2))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(tlora.layers) == 4 * len(attns) > 0
    for m in attns:
        for proj in (m.to_q, m.to_k, m.to_v, m.to_out[0]):
            assert type(proj) is torch.nn.Linear and hasattr(proj, ADAPTER)  # the module itself is kept


def test_mask_follows_the_unet_timestep(unet):
    tlora = attach(unet, TLoRASettings("lora", 4, 1))
    seen = []
    next(iter(tlora.adapters.values())).register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with torch.no_grad():
        unet(timestep=torch.tensor([0, 999]), **unet_inputs(unet))
        unet(timestep=500, **unet_inputs(unet))
    assert seen[0].sum(1).tolist() == [4, 1]
    assert seen[-1].shape == (1, 4) and seen[-1].sum().item() == active_rank(500, 1000, 4, 1).item()


def test_sdxl_lora_has_no_mask(unet):
    tlora = attach(unet, TLoRASettings("lora", 4, 1, timestep_dependent=False))
    with torch.no_grad():
        unet(timestep=999, **unet_inputs(unet))
    assert tlora.state.mask is None


def test_zero_effect_at_init_then_timestep_dependent(unet):
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(timestep=torch.tensor([10, 900]), **inputs).sample
        tlora = attach(unet, TLoRASettings("ortho_lora", 4, 1))
        assert torch.equal(unet(timestep=torch.tensor([10, 900]), **inputs).sample, base)
        perturb(tlora)
        out = unet(timestep=torch.tensor([10, 900]), **inputs).sample
    assert not torch.allclose(out, base)


def test_unload_restores_exactly_and_scale_zero_is_base(unet):
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(timestep=300, **inputs).sample
        tlora = attach(unet, TLoRASettings("lora", 4, 2))
        perturb(tlora)
        assert not torch.equal(unet(timestep=300, **inputs).sample, base)
        tlora.set_scale(0.0)
        assert torch.equal(unet(timestep=300, **inputs).sample, base)
        tlora.set_scale(1.0)
        tlora.unload()
        assert torch.equal(unet(timestep=300, **inputs).sample, base)
    assert attached(unet) is None
    assert not any(hasattr(m, ADAPTER) or m._forward_hooks for m in unet.modules())
    assert not unet._forward_pre_hooks


def test_attach_twice_is_an_error(unet):
    attach(unet, TLoRASettings("lora", 4, 1))
    with pytest.raises(ValueError, match="already"):
        attach(unet, TLoRASettings("lora", 4, 1))


def test_per_layer_rank_is_capped(unet):
    tlora = attach(unet, TLoRASettings("lora", 80, 1))  # the tiny UNet's attention layers are 64 wide
    for _, layer in tlora.layers.values():
        adapter = getattr(layer, ADAPTER)
        assert adapter.rank == min(80, layer.in_features, layer.out_features) == 64
        assert adapter.down.weight.shape == (64, layer.in_features)


def test_adapters_follow_the_seed_in_module_order(unet, tiny_model):
    """Same seed, same adapters: creation order is attn_processors order, q, k, v, out."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    first = attach(unet, TLoRASettings("ortho_lora", 4, 1)).state_dict()
    other = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(0)
    second = attach(other, TLoRASettings("ortho_lora", 4, 1)).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    order = [k.rsplit(".processor", 1)[0] for k in first if k.endswith("to_q_lora.q_layer.weight")]
    assert order == [k.rsplit(".processor", 1)[0] for k in unet.attn_processors]
