"""Adapters on a real (tiny) diffusers UNet: processors kept, mask from the UNet's timestep, unload."""

import pytest
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


def test_each_entry_of_a_denoiser_masks_by_its_own_calls_t():
    """Two models a pipeline calls one at a time (Wan 2.2's experts: DenoiserSpec.entries), each with its own
    timestep: each one's adapters get the mask of its own call's t, kept until its next call (what gradient
    checkpointing recomputes in backward), and unload removes every hook."""
    from torch import nn

    from tlora.method.denoiser import DenoiserSpec, Layer
    from tlora.method.injection import attach as attach_described

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, timestep):
            return self.proj(x)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.high, self.low = Expert(), Expert()

    pair, settings = Pair(), TLoRASettings("lora", 8, 2, rank_rule="divide_first")
    spec = DenoiserSpec((Layer("high.proj_lora", "high.proj"), Layer("low.proj_lora", "low.proj")),
                        entries=("high", "low"))
    tl = attach_described(pair, settings, spec)
    seen = {}
    taps = [getattr(pair, e).proj.register_forward_hook(lambda m, a, o, e=e: seen.__setitem__(e, tl.states[e].active))
            for e in ("high", "low")]
    pair.high(torch.randn(1, 8), torch.tensor([900.0]))
    pair.low(torch.randn(2, 8), torch.tensor([100.0, 500.0]))
    for tap in taps:
        tap.remove()
    assert tl.state is tl.states["high"] and tl.states["high"] is not tl.states["low"]
    assert seen["high"].sum(1).tolist() == [float(settings.active_rank(torch.tensor(900.0)))]
    assert seen["low"].sum(1).tolist() == [float(settings.active_rank(torch.tensor(t))) for t in (100.0, 500.0)]
    assert int(tl.states["high"].mask.sum()) < int(tl.states["low"].mask[0].sum())  # the low call left high's alone
    tl.set_scale(0)
    assert all(s.scale == 0 for s in tl.states.values())
    x = torch.randn(1, 8)
    assert torch.equal(pair.low(x, torch.tensor([0.0])), pair.low.proj(x))
    assert tl.unload() is pair and not pair.high._forward_pre_hooks and not pair.low._forward_pre_hooks
    assert not hasattr(pair.high.proj, ADAPTER)


def test_the_trainable_parameters_are_listed_once(unet):
    """The optimizer and clipping at every step take the same list (not one built again per step)."""
    adapters = attach(unet, TLoRASettings("ortho_lora", 4, 2))
    params = adapters.trainable_parameters()
    assert params is adapters.trainable_parameters() and len(params) == 3 * len(adapters.layers)
    assert all(p.requires_grad for p in params)


def test_two_processes_agree_on_a_stop_only_at_due_steps():
    """With several processes a stop request costs an all-gather and a host sync only at the steps the trainer marks
    due (each LOSS_FLUSH_STEPS-th and each checkpoint): none at the others."""
    from types import SimpleNamespace

    from tlora.train.stopping import StopSignals

    gathered = []
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                  gather=lambda t: gathered.append(t) or torch.cat([t, torch.tensor([0])]))
    signals = StopSignals()
    signals.signum = 15
    assert signals.requested(accelerator, due=False) == 0 and not gathered
    assert signals.requested(accelerator, due=True) == 15 and len(gathered) == 1
    assert signals.requested(SimpleNamespace(num_processes=1), due=False) == 15  # one process: no collective at all


def test_one_denoiser_call_casts_its_mask_once_and_each_layer_keeps_its_output_dtype(unet):
    """Under autocast every adapter shares one cast of the call's mask (not one per adapter), and an adapted layer
    returns the dtype it returns without the T-LoRA (peft's rule: the update is added in the output's dtype)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.helpers import sdxl_inputs

    class MaskCasts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.casts = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16:
                self.casts.append(args[0])
            return out

    inputs = sdxl_inputs(unet)  # (float32 text embeddings: the cross-attention's to_k gets a float32 input)
    linear = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    seen = []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        hook = linear.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        unet(timestep=torch.tensor([100, 900]), **inputs)
        hook.remove()
        adapters = attach(unet, TLoRASettings("ortho_lora", 4, 2))
        hook = linear.register_forward_hook(lambda m, a, o: seen.append(o.dtype))  # after the T-LoRA's own hook
        try:
            counter = MaskCasts()
            with counter:
                unet(timestep=torch.tensor([100, 900]), **inputs)
        finally:
            hook.remove()
            adapters.unload()
    mask = adapters.state.active
    assert [c for c in counter.casts if c.shape == mask.shape and torch.equal(c, mask)] == [mask]
    assert len(adapters.layers) > 10
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_fusing_is_checked_when_it_happens_not_by_a_scan_at_every_call(unet, monkeypatch):
    from tests.helpers import sdxl_inputs
    from tlora.method.injection import TLoRA

    inputs = sdxl_inputs(unet, batch=1)
    adapters = attach(unet, TLoRASettings("lora", 4, 2))
    scans = []
    full = TLoRA.check_usable
    monkeypatch.setattr(TLoRA, "check_usable", lambda self: scans.append(1) or full(self))
    try:
        with torch.no_grad():
            unet(timestep=torch.tensor([500]), **inputs)
            unet(timestep=torch.tensor([300]), **inputs)
            assert scans == []
            unet.fuse_qkv_projections()
            for _ in range(2):  # refused at every call while fused
                with pytest.raises(ValueError, match="fuse_qkv_projections"):
                    unet(timestep=torch.tensor([500]), **inputs)
            unet.unfuse_qkv_projections()
            unet(timestep=torch.tensor([500]), **inputs)
            unet(timestep=torch.tensor([500]), **inputs)
        assert len(scans) == 3
    finally:
        adapters.unload()
    assert all("fuse_projections" not in a.__dict__ for a in adapters._attentions)


def test_a_model_with_a_t_lora_deep_copies_and_pickles_and_its_copy_fuses_alone(unet):
    import copy
    import io

    adapters = attach(unet, TLoRASettings("lora", 4, 2))
    try:
        twin = copy.deepcopy(unet)
        torch.save(unet, io.BytesIO())
        twin.fuse_qkv_projections()
        path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
        assert not adapters.spec.fused(unet.get_submodule(path)) and not adapters._fused_since_check
        assert adapters.spec.fused(twin.get_submodule(path)) and twin._tlora._fused_since_check
    finally:
        adapters.unload()


@pytest.mark.slow  # imports dynamo (0.4 s)
def test_a_denoiser_compiled_before_the_t_lora_is_refused_while_dynamo_skips_hook_guards(unet):
    """Dynamo's default guards no hooks: a graph compiled before the T-LoRA would keep running without it. (Its
    config is patched with its own `patch`: pytest's monkeypatch deletes a torch config entry on undo.)"""
    import torch._dynamo

    from tlora.common.errors import UsageError

    unet.compile()
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
            with pytest.raises(UsageError, match="load the T-LoRA first, then compile"):
                attach(unet, TLoRASettings("lora", 4, 2))
        assert not hasattr(unet, "_tlora")
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):  # compile_denoiser's setting
            attach(unet, TLoRASettings("lora", 4, 2)).unload()
    finally:
        unet._compiled_call_impl = None
