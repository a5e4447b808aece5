"""What every model family shares, written once and run on each (as diffusers' PipelineTesterMixin does): adapters
on every adapted projection with the processors kept, zero at the start, exact unload and scale, the mask of
each sample from its own timestep through the stock pipelines, save -> load, and analyze's kinds of layer.
A new family gets these by adding its tiny model to `families_case.CASES`."""

import pytest
import torch

import tlora
from tlora.evaluation.analysis import analyse_updates
from tlora.families import FAMILIES
from tlora.method.adapters import active_rank, rank_mask
from tlora.method.injection import ADAPTER
from tlora.runs.weights import save_weights

from families_case import case_of
from helpers import left_as_found, perturb


@pytest.fixture
def case(family, request):
    """The family's tiny pipeline (shared by the session: left as it was found after each test)."""
    case = case_of(family, request)
    yield case
    left_as_found(case.pipe)


def processor_types(model) -> dict:
    """Each attention module's processor class (diffusers' attn_processors, which Z-Image's transformer lacks)."""
    return {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}


def test_adapters_on_every_projection_processors_kept(case):
    processors = processor_types(case.model)
    adapters = tlora.attach(case.model, tlora.TLoRASettings("ortho_lora", 4, 2))
    paths = [layer.path for layer in case.family.layers(case.model) if layer.path is not None]
    assert processor_types(case.model) == processors
    assert len(adapters.layers) == len(paths) > 0
    assert all(type(case.model.get_submodule(p)) is torch.nn.Linear and hasattr(case.model.get_submodule(p), ADAPTER)
               for p in paths)
    with pytest.raises(ValueError, match="already"):
        tlora.attach(case.model, tlora.TLoRASettings("lora", 4, 1))


@pytest.mark.parametrize("trainer_type", ["lora", "ortho_lora"])
def test_zero_at_the_start_and_unload_exact(case, trainer_type):
    t = torch.tensor([10.0, 900.0])
    base = case.output(t)
    adapters = tlora.attach(case.model, tlora.TLoRASettings(trainer_type, 4, 1))
    assert torch.equal(case.output(t), base)  # P0 L0 Q0 cancel P L Q, B = 0: exactly nothing
    perturb(adapters)
    assert not torch.allclose(case.output(t), base)
    adapters.unload()
    assert torch.equal(case.output(t), base)
    assert not any(hasattr(m, ADAPTER) or m._forward_hooks for m in case.model.modules())
    assert not case.model._forward_pre_hooks


def test_each_sample_is_masked_by_its_own_timestep(case):
    adapters = tlora.attach(case.model, tlora.TLoRASettings("lora", 8, 2))
    perturb(adapters)
    rule = adapters.settings.rule
    together = case.output(torch.tensor([100.0, 900.0]))
    assert adapters.state.mask.sum(1).tolist() == active_rank(torch.tensor([100, 900]), 1000, 8, 2, rule=rule).tolist()
    for i, t in enumerate((100.0, 900.0)):
        alone = case.output(torch.tensor([t, t]))
        assert torch.allclose(together[i], alone[i], atol=1e-5)
    adapters.set_scale(1.0)
    adapters.state.settings = tlora.TLoRASettings("lora", 8, 2, timestep_dependent=False, family=case.name)
    case.output(torch.tensor([100.0, 900.0]))
    assert adapters.state.mask is None  # <family>_lora: every component at every t


def test_save_load_scale_and_unload_through_the_api(case, tmp_path):
    t = torch.tensor([250.0, 750.0])
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    base = case.output(t)
    adapters = tlora.attach(case.model, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters, seed=3)
    trained = case.output(t)
    save_weights(adapters.state_dict(), tmp_path / "checkpoint-5", adapters.settings.to_metadata())
    adapters.unload()
    loaded = tlora.load(case.pipe, tmp_path / "checkpoint-5")  # nothing beside the file: its metadata says it all
    assert loaded.settings == adapters.settings
    assert torch.equal(case.output(t), trained)
    tlora.set_scale(case.pipe, 0.0)
    assert torch.equal(case.output(t), base)
    tlora.set_scale(case.pipe, 1.0)
    tlora.unload(case.pipe)
    assert torch.equal(case.output(t), base)
    after = case.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_mask_follows_every_denoising_step_of_the_stock_pipelines(case):
    """Text-to-image, img2img and inpainting (which start part-way, by strength): at each call of the denoiser,
    each sample's mask is r(t) of the scheduler's t."""
    adapters = tlora.attach(case.model, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    hook = case.model.register_forward_pre_hook(lambda m, a, k: seen.append(adapters.state.mask.clone()),
                                                with_kwargs=True)
    try:
        variants = [(case.pipe, {})]
        if case.spec.inpaint is not None:  # a text-to-video family has none
            variants.append((case.variant("inpaint"), case.image_kwargs(mask=True)))
        if case.spec.img2img is not None:
            variants.insert(1, (case.variant("img2img"), case.image_kwargs()))
        for pipe, extra in variants:
            seen.clear()
            pipe(prompt="a photo of sks dog", num_inference_steps=4, output_type="np", **{case.spec.per_prompt: 2},
                 generator=torch.Generator().manual_seed(0), **case.call_kwargs, **extra)
            per = case.spec.calls_per_step
            steps = pipe.scheduler.timesteps[-(len(seen) // per):].repeat_interleave(per)
            assert len(seen) >= 2 and len(seen) == len(steps)
            for mask, step in zip(seen, steps):  # one row per sample, or one for the batch (a scalar timestep)
                expected = rank_mask(torch.tensor([step.item()]), 1000, 8, 2, rule=adapters.settings.rule)
                assert torch.equal(mask, expected.expand(len(mask), -1))
            assert seen[0].sum(1)[0] < seen[-1].sum(1)[0]  # fewer components at the noisy start
    finally:
        hook.remove()


def test_analyze_names_each_kind_of_layer(case):
    adapters = tlora.attach(case.model, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters)
    layers = analyse_updates(case.family, adapters.state_dict(), adapters.settings)
    assert {v["kind"] for v in layers.values()} == set(case.family.layer_kinds)
    assert all(1 <= v["effective_rank"] <= 8 for v in layers.values())


@pytest.mark.slow
def test_the_scheduled_export_is_the_exact_tlora_in_the_stock_pipeline(case, tmp_path):
    """`--format diffusers-scheduled` + tlora.scheduled: stock load_lora_weights and set_adapters give the images
    tlora.load gives, on every family's pipeline (flow-matching ones start at t = T, sigma 1)."""
    from tlora.interop import exporting

    adapters = tlora.attach(case.model, tlora.TLoRASettings("ortho_lora", 4, 1))
    perturb(adapters, seed=5)
    save_weights(adapters.state_dict(), tmp_path / "checkpoint-1",
                 adapters.settings.to_metadata() | case.family.model_metadata(case.model))
    tlora.unload(case.pipe)
    assert exporting.main([str(tmp_path / "checkpoint-1"), "--format", "diffusers-scheduled", "--out",
                        str(tmp_path / "scheduled")]) == 0

    def images(callback=None):
        extra = {"callback_on_step_end": callback} if callback else {}
        return case.pipe(prompt="a photo of sks dog", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                         output_type="latent", **case.call_kwargs, **extra)[0]  # images, or a video pipeline's frames

    base = images()
    tlora.load(case.pipe, tmp_path / "checkpoint-1")
    expected = images()
    tlora.unload(case.pipe)
    step = tlora.scheduled(case.pipe, tmp_path / "scheduled", num_inference_steps=4)
    try:
        got = images(step)
    finally:
        case.pipe.unload_lora_weights()  # the session's pipeline as it was
    assert (got - expected).abs().max() <= 1e-4
    assert (got - base).abs().max() > 1e-3



@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_what_diffusers_loads(family, dtype, request):
    """Loading in half precision goes through float32 and casts tensor by tensor, giving the checkpoint's mapped
    pages back: every tensor equals diffusers' own half-precision load bit for bit, in the same dtype (T5's `wo`
    stays float32 under fp16, as transformers keeps it)."""
    from tlora.families.pipelines import load_pipeline

    path = request.getfixturevalue(f"tiny_{family}")
    ours = load_pipeline(str(path), "none", dtype=dtype, family=FAMILIES[family])
    theirs = FAMILIES[family].pipeline_class.from_pretrained(str(path), dtype=dtype)
    FAMILIES[family].prepare(theirs, dtype)
    kept = 0
    for name, part in ours.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        other = theirs.components[name]
        mine, stock = dict(part.named_buffers()) | part.state_dict(), dict(other.named_buffers()) | other.state_dict()
        assert mine.keys() == stock.keys()
        for key, tensor in mine.items():
            assert tensor.dtype == stock[key].dtype and torch.equal(tensor, stock[key]), (name, key)
            kept += tensor.dtype == torch.float32 and tensor.is_floating_point()
    if (family, dtype) == ("flux", torch.float16):
        assert kept > 0  # T5's wo layers


def test_only_pages_of_read_only_file_maps_are_dropped(tiny_sdxl):
    """FilePages.drop never touches memory that is not a clean copy of a file (it would read back as zeros)."""
    from safetensors.torch import load_file

    from tlora.common.mapped import FilePages

    anonymous = torch.ones(1 << 20)
    pages = FilePages()
    assert not pages.drop(anonymous) and torch.equal(anonymous, torch.ones(1 << 20))
    mapped = load_file(str(next((tiny_sdxl / "unet").glob("*.safetensors"))))
    before = {k: v.clone() for k, v in mapped.items()}
    pages = FilePages()
    dropped = [pages.drop(v) for v in mapped.values()]
    assert all(torch.equal(v, before[k]) for k, v in mapped.items())  # re-read from the file
    assert any(dropped) or not pages.ranges
