"""A T-LoRA beside ordinary diffusers LoRAs: all apply at once, each scale acts alone, each unloads only itself."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import tlora
from test_injection import perturb, unet_inputs
from tlora.models import load_pipeline

PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def other_lora(tiny_model, tmp_path_factory):
    """A random rank-2 diffusers LoRA on the UNet's attention projections, saved by save_lora_weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=PROJECTIONS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("other_lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture(scope="module")
def tlora_checkpoint(tiny_model, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from tlora.checkpoint import save_weights

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    adapters = tlora.attach(unet, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters, seed=5)
    folder = tmp_path_factory.mktemp("tlora_ckpt")
    save_weights(adapters.state_dict(), folder, adapters.settings.to_metadata())
    return folder


def output(pipe, inputs):
    with torch.no_grad():
        return pipe.unet(timestep=torch.tensor([100, 800]), **inputs).sample


@pytest.mark.parametrize("tlora_first", [True, False], ids=["tlora-then-lora", "lora-then-tlora"])
@pytest.mark.parametrize("unload_tlora_first", [True, False], ids=["unload-tlora-first", "unload-lora-first"])
def test_tlora_and_diffusers_lora_together(tiny_model, other_lora, tlora_checkpoint, tlora_first, unload_tlora_first):
    pipe = load_pipeline(str(tiny_model), "none")
    inputs = unet_inputs(pipe.unet)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = output(pipe, inputs)

    def load_tlora():
        tlora.load(pipe, tlora_checkpoint)

    def load_other():
        pipe.load_lora_weights(str(other_lora), adapter_name="other")

    # What each one alone gives.
    load_tlora()
    tlora_only = output(pipe, inputs)
    tlora.unload(pipe)
    load_other()
    other_only = output(pipe, inputs)
    pipe.unload_lora_weights()
    assert not torch.equal(tlora_only, base) and not torch.equal(other_only, base)

    for load in ((load_tlora, load_other) if tlora_first else (load_other, load_tlora)):
        load()
    both = output(pipe, inputs)
    assert not torch.allclose(both, tlora_only) and not torch.allclose(both, other_only)  # both apply
    pipe.set_adapters(["other"], [0.0])  # diffusers' weight acts on its LoRA only
    assert torch.allclose(output(pipe, inputs), tlora_only, atol=1e-6)
    pipe.set_adapters(["other"], [1.0])
    tlora.set_scale(pipe, 0.0)  # and tlora's scale on the T-LoRA only
    assert torch.allclose(output(pipe, inputs), other_only, atol=1e-6)
    tlora.set_scale(pipe, 1.0)
    assert torch.equal(output(pipe, inputs), both)

    if unload_tlora_first:
        tlora.unload(pipe)
        assert torch.allclose(output(pipe, inputs), other_only, atol=1e-6)  # the other LoRA stays
        pipe.unload_lora_weights()
    else:
        pipe.unload_lora_weights()
        assert torch.allclose(output(pipe, inputs), tlora_only, atol=1e-6)  # the T-LoRA stays
        tlora.unload(pipe)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(output(pipe, inputs), base)
