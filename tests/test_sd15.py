"""Stable Diffusion 1.5: what is its own (the timestep its pipelines pass, DDPM's target, telling its UNet and files
from SDXL's, ComfyUI's and diffusers' reading of its exports, the train.py command line); what it shares with the
other families is in test_families."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPImageProcessor

import tlora
from tlora.families import FAMILIES, detect, of_keys, of_model
from tlora.families.sd15 import SD15
from tlora.method.adapters import rank_mask
from tlora.runs.weights import save_weights

from helpers import perturb, read_weights, sd15_inputs, tlora_and_export_outputs, train_args

COMFY = json.loads((Path(__file__).parent / "comfyui_keys" / "sd15.json").read_text())


def tlora_keys(pipe) -> list[str]:
    adapters = tlora.attach(pipe.unet, tlora.TLoRASettings("lora", 4, 1))
    try:
        return list(adapters.state_dict())
    finally:
        tlora.unload(pipe)


@pytest.mark.parametrize("stock", [True, False], ids=["pndm-as-published", "euler-as-loaded"])
def test_the_pipeline_passes_the_schedulers_integer_timestep_and_the_mask_is_r_of_it(tiny_sd15, sd15_pipe, stock):
    """StableDiffusionPipeline calls `self.unet(latent_model_input, t, ...)` with the scheduler's timestep as it
    is (PNDM, the published scheduler, repeats its first; tlora samples with Euler): t is the paper's t, and the
    mask at each call is r(t)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15) if stock else sd15_pipe
    pipe.set_progress_bar_config(disable=True)
    adapters = tlora.attach(pipe.unet, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    position = SD15.timestep_arg[1]
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[position], adapters.state.mask.clone())), with_kwargs=True)
    try:
        pipe("a photo of sks dog", num_inference_steps=4, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
        tlora.unload(pipe)
    steps = pipe.scheduler.timesteps
    assert len(seen) == len(steps) == (5 if stock else 4)
    assert all(0 <= s < 1000 and float(s) == int(s) for s in steps)
    for (timestep, mask), step in zip(seen, steps):
        assert float(timestep) == float(step) and SD15.scheduler_t(step).item() == float(step)
        assert torch.equal(SD15.diffusion_t(torch.as_tensor(timestep)), torch.as_tensor(timestep))
        expected = rank_mask(torch.tensor([float(step)]), 1000, 8, 2, rule=SD15.rank_rule)
        assert torch.equal(mask, expected.expand(len(mask), -1))
    assert seen[0][1].sum() < seen[-1][1].sum()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_training_loss_is_ddpm_noise_or_velocity_of_scaled_latents(sd15_pipe, prediction_type):
    """Recomputed by hand from the published betas (scaled_linear 0.00085..0.012): latents from the cached
    distribution times 0.18215, noise, integer t in [0, 1000) drawn in that order; x_t = sqrt(a) x0 + sqrt(1 - a) e;
    the target is e (epsilon) or sqrt(a) e - sqrt(1 - a) x0 (v_prediction, SD 2.x)."""
    unet, vae = sd15_pipe.unet, sd15_pipe.vae
    scheduler = DDPMScheduler.from_config(SD15.noise_scheduler(sd15_pipe).config, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    batch = {"mean": torch.randn(2, 4, 8, 8, generator=g), "std": torch.rand(2, 4, 8, 8, generator=g) * 0.1,
             "prompt_embeds": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}
    torch.manual_seed(7)
    with torch.no_grad():
        pred, target = SD15.predict(unet, sd15_pipe, scheduler, batch, torch.float32, 1.0)
    torch.manual_seed(7)
    assert vae.config.scaling_factor == 0.18215
    x0 = (batch["mean"] + batch["std"] * torch.randn(2, 4, 8, 8)) * 0.18215
    noise = torch.randn(2, 4, 8, 8)
    t = torch.randint(0, 1000, (2,))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    a = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        expected = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, batch["prompt_embeds"]).sample
    assert (pred - expected).abs().max() < 1e-5
    want = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert (target - want).abs().max() < 1e-6


def test_its_unet_files_and_model_are_told_from_sdxls(sd15_pipe, sdxl_pipe, tiny_sd15, tmp_path):
    """A UNet without addition embeddings is SD 1.5's; its keys (attention in the first down block, none in the
    first up block) say sd15, SDXL's say sdxl, and neither pipeline loads the other's T-LoRA."""
    assert of_model(sd15_pipe) is SD15 and of_model(sdxl_pipe) is FAMILIES["sdxl"]
    assert detect(str(tiny_sd15)) == "sd15"
    sd15, sdxl = tlora_keys(sd15_pipe), tlora_keys(sdxl_pipe)
    assert of_keys(sd15) == ["sd15"] and of_keys(sdxl) == ["sdxl"]
    assert of_keys(["lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.q_layer.weight"]) == ["sd15"]
    adapters = tlora.attach(sd15_pipe.unet, tlora.TLoRASettings("lora", 4, 1))
    perturb(adapters)
    save_weights(adapters.state_dict(), tmp_path / "alone", {"trainer_type": "lora", "lora_rank": 4})
    tlora.unload(sd15_pipe)
    ckpt = tlora.read(tmp_path / "alone", quiet=True)
    assert ckpt.settings.family == "sd15" and ckpt.sources["family"] == "the tensors"
    with pytest.raises(ValueError, match="was trained on sd15; this is a sdxl model"):
        tlora.load(sdxl_pipe, tmp_path / "alone")


def test_the_tiny_model_has_no_safety_checker_and_loading_drops_one(tiny_sd15, sd15_pipe):
    index = json.loads((tiny_sd15 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert sd15_pipe.safety_checker is None and type(sd15_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    other = StableDiffusionPipeline(**{**sd15_pipe.components, "safety_checker": torch.nn.Linear(1, 1),
                                       "feature_extractor": CLIPImageProcessor()})
    SD15.prepare(other, torch.float32)
    assert other.safety_checker is None and other.components["safety_checker"] is None


@pytest.fixture(scope="module", params=[pytest.param("lora", marks=pytest.mark.slow), "ortho_lora"])
def sd15_checkpoint(request, sd15_pipe, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny SD 1.5 with the metadata our runs write."""
    adapters = tlora.attach(sd15_pipe.unet, tlora.TLoRASettings(request.param, 4, 2))
    perturb(adapters, seed=7)
    folder = tmp_path_factory.mktemp(f"sd15_{request.param}") / "checkpoint-10"
    save_weights(adapters.state_dict(), folder, adapters.settings.to_metadata())
    tlora.unload(sd15_pipe)
    return folder


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exports_load_in_stable_diffusion_and_comfyui_and_equal_the_tlora(sd15_pipe, sd15_checkpoint, tmp_path, fmt):
    """`--mask full` (every component: the T-LoRA at t = 0) and `--mask timestep:T`: StableDiffusionPipeline's
    load_lora_weights reads the file (kohya's original-UNet names with the UNet's config, as the SDXL loader passes
    it) and gives the T-LoRA's output; every kohya key is one ComfyUI maps for SD 1.5."""
    from tlora.interop.exporting import main

    pipe, unet, inputs = sd15_pipe, sd15_pipe.unet, sd15_inputs(sd15_pipe.unet, 1, 0)
    for mask, t in (("full", 0), ("timestep:999", 999), ("timestep:400", 400)):
        out = tmp_path / f"{fmt}_{t}.safetensors"
        assert main([str(sd15_checkpoint), "--format", fmt, "--out", str(out), "--mask", mask]) == 0
        step = torch.tensor([t])
        config = {"unet_config": unet.config} if fmt == "kohya" else {}  # maps the original UNet's block names
        expected, got, base = tlora_and_export_outputs(
            pipe, sd15_checkpoint, out, lambda: unet(timestep=step, return_dict=False, **inputs)[0], **config)
        assert (got - expected).abs().max() <= 1e-5, mask
        assert (base - expected).abs().max() > 1e-3
    weights, meta = read_weights(out)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in weights}
    assert len(prefixes) == len(SD15.layers(unet))
    if fmt == "kohya":
        assert prefixes <= set(COMFY["keys"]), sorted(prefixes - set(COMFY["keys"]))[:3]
        assert meta["ss_base_model_version"] == "sd_v1"
    else:
        assert all(k.startswith("unet.") for k in weights)


def test_the_comfyui_fixture_is_the_published_unets():
    """128 attention projections (16 transformer blocks x 2 attentions x q, k, v, out), six names each."""
    from comfyui_keys.derive_sd15 import COMFY_SD15, key_map, unet_config

    assert COMFY["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and COMFY["source"].endswith(
        "comfy/lora.py model_lora_keys_unet")
    assert unet_config(SD15.architectures["sd15"]["unet"][2]) == COMFY_SD15
    assert COMFY["keys"] == sorted(key_map(COMFY_SD15)) and len(COMFY["keys"]) == 128 * 6


def test_no_authors_format_for_sd15(sd15_checkpoint, tmp_path, capsys):
    from tlora.interop.exporting import main

    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert main([str(sd15_checkpoint), "--format", "authors", "--out", str(out)]) == 2 and not out.exists()
    assert "the authors released no code for it; use --format diffusers or kohya" in capsys.readouterr().err


def test_train_defaults_are_sd15s_native_512_px(tiny_sd15, tiny_sdxl, image_dir, tmp_path):
    from tlora.train.options import parse_args

    def resolution(model: Path) -> int:
        argv = train_args(model, image_dir, tmp_path / "out", "--trainer_class", f"{detect(str(model))}_tlora")
        return parse_args([a for a in argv if a not in ("--resolution", "64")]).resolution

    assert resolution(tiny_sd15) == 512 and resolution(tiny_sdxl) == 1024

