"""A T-LoRA beside ordinary diffusers LoRAs: all apply at once, each scale acts alone, each unloads only itself."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import tlora
from tlora.families.pipelines import load_pipeline

from helpers import perturb, sdxl_inputs

PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def other_lora(tiny_sdxl, tmp_path_factory):
    """A random rank-2 diffusers LoRA on the UNet's attention projections, saved by save_lora_weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=PROJECTIONS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("other_lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture(scope="module")
def tlora_checkpoint(tiny_sdxl, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from tlora.runs.weights import save_weights

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    adapters = tlora.attach(unet, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters, seed=5)
    folder = tmp_path_factory.mktemp("tlora_ckpt")
    save_weights(adapters.state_dict(), folder, adapters.settings.to_metadata())
    return folder


def output(pipe, inputs):
    with torch.no_grad():
        return pipe.unet(timestep=torch.tensor([100, 800]), **inputs).sample


@pytest.mark.slow
@pytest.mark.parametrize("tlora_first", [True, False], ids=["tlora-then-lora", "lora-then-tlora"])
@pytest.mark.parametrize("unload_tlora_first", [True, False], ids=["unload-tlora-first", "unload-lora-first"])
def test_tlora_and_diffusers_lora_together(borrowed_sdxl_pipe, other_lora, tlora_checkpoint, tlora_first,
                                           unload_tlora_first):
    pipe = borrowed_sdxl_pipe
    inputs = sdxl_inputs(pipe.unet)
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


def test_fusing_a_diffusers_lora_keeps_the_tlora(borrowed_sdxl_pipe, other_lora, tlora_checkpoint):
    pipe = borrowed_sdxl_pipe
    inputs = sdxl_inputs(pipe.unet)
    tlora.load(pipe, tlora_checkpoint)
    pipe.load_lora_weights(str(other_lora), adapter_name="other")
    both = output(pipe, inputs)
    pipe.fuse_lora()  # the other LoRA merged into the base weights; the T-LoRA hooks stay on the base layers
    assert torch.allclose(output(pipe, inputs), both, atol=1e-5)
    pipe.unfuse_lora()
    assert torch.allclose(output(pipe, inputs), both, atol=1e-5)


@pytest.fixture
def loaded(tiny_sdxl, tlora_checkpoint):
    """A pipeline of its own (the tests fuse, compile and offload it) with the T-LoRA loaded."""
    pipe = load_pipeline(str(tiny_sdxl), "none")
    tlora.load(pipe, tlora_checkpoint)
    return pipe


def test_fused_projections_are_refused_not_silently_dropped(loaded):
    inputs = sdxl_inputs(loaded.unet)
    before = output(loaded, inputs)
    loaded.fuse_qkv_projections()  # a fused to_qkv would run instead of the to_q / to_k / to_v the T-LoRA is on
    with pytest.raises(ValueError, match=r"fuse_qkv_projections\): the fused layer bypasses the T-LoRA"):
        output(loaded, inputs)
    loaded.unfuse_qkv_projections()
    assert torch.equal(output(loaded, inputs), before)


def test_fused_projections_on_flux(flux_pipe, tmp_path):
    torch.manual_seed(0)
    adapters = tlora.attach(flux_pipe.transformer, tlora.TLoRASettings("lora", 4, 1))
    try:
        flux_pipe.transformer.fuse_qkv_projections()
        with pytest.raises(ValueError, match="fuse_qkv_projections"):
            flux_pipe("a sks dog", num_inference_steps=1, height=64, width=64, max_sequence_length=16)
        flux_pipe.transformer.unfuse_qkv_projections()
        adapters.check_usable()
    finally:
        adapters.unload()


@pytest.mark.slow
def test_a_compiled_unet_keeps_the_tlora(loaded):
    """Compiled, the mask keeps its full width (a new t never recompiles), so the products' rounding differs from
    eager's on the CPU, where the mask ends at its largest active rank; unloaded, the base model exactly."""
    inputs = sdxl_inputs(loaded.unet)
    tlora.set_scale(loaded, 0.0)
    base = output_at(loaded.unet, inputs, (100, 800))
    tlora.set_scale(loaded, 1.0)
    expected = {t: output_at(loaded.unet, inputs, t) for t in ((100, 800), (900, 5))}
    loaded.unet = torch.compile(loaded.unet, backend="eager")  # dynamo traces the hooks; no compiler needed here
    for t, out in expected.items():  # each sample's mask follows its timestep inside the compiled graph
        assert torch.allclose(output_at(loaded.unet, inputs, t), out, rtol=1e-5, atol=1e-6)
    tlora.unload(loaded)  # through the compiled wrapper; dynamo's guards see the hooks go
    assert torch.equal(output_at(loaded.unet, inputs, (100, 800)), base)


def output_at(unet, inputs, t):
    with torch.no_grad():
        return unet(timestep=torch.tensor(t), **inputs).sample


def test_layer_by_layer_offload_is_refused_not_garbage(loaded):
    """accelerate's cpu_offload (enable_sequential_cpu_offload) leaves adapter weights off-device between calls;
    the adapters read them directly, so the T-LoRA refuses to run rather than compute with empty weights."""
    from accelerate import cpu_offload

    inputs = sdxl_inputs(loaded.unet)
    cpu_offload(loaded.unet, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded layer by layer"):
        output(loaded, inputs)
