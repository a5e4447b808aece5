"""Wan 2.1: what is its own (the timestep WanPipeline passes, the flow-matching target on normalised one-frame
latents, ComfyUI's and diffusers' LoRA files, Wan 2.2 TI2V refused, videos saved); clips in the data folder are in
test_wan_clips; what it shares with the other families is in test_families."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import WanPipeline
from PIL import Image

import tlora
from tlora.common.errors import UsageError
from tlora.common.messages import Note
from tlora.families import FAMILIES
from tlora.families.wan import Wan
from tlora.formats import kohya
from tlora.generate import video
from tlora.runs.weights import save_weights

from conftest import assert_helpful
from helpers import perturb, read_weights, train_args, wan_inputs, with_flags

COMFY = Path(__file__).parent / "comfyui_keys"
CALL = {"height": 32, "width": 32, "max_sequence_length": 16}


@pytest.mark.parametrize("steps", [3, 7])
def test_the_transformer_gets_the_schedulers_t_and_the_mask_is_r_of_it(borrowed_wan_pipe, steps):
    """WanPipeline calls the transformer with its scheduler's t (UniPC, flow sigmas: int64 sigma x 1000) for each
    video, twice a step (guidance: conditional and unconditional): the paper's t itself, masked by r(t)."""
    pipe = borrowed_wan_pipe
    adapters = tlora.attach(pipe, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["timestep"].clone(), adapters.state.mask.clone())), with_kwargs=True)
    try:
        pipe("a photo of sks dog", num_frames=1, num_inference_steps=steps, num_videos_per_prompt=2,
             output_type="latent", generator=torch.Generator().manual_seed(0), **CALL)
    finally:
        hook.remove()
    expected = pipe.scheduler.timesteps.repeat_interleave(2)
    assert len(seen) == len(expected) == 2 * steps and expected[0] == 999  # sigma 1 - 1e-6: pure noise
    for (timestep, mask), t in zip(seen, expected):
        assert torch.equal(timestep, t.expand(2))
        assert torch.equal(Wan.diffusion_t(timestep), timestep) and float(Wan.scheduler_t(t)) == float(t)
        assert torch.equal(mask, adapters.settings.mask(timestep.float()))
    assert seen[0][1].sum(1)[0] < seen[-1][1].sum(1)[0]


def test_the_loss_is_flow_matching_on_the_normalised_one_frame_latent(wan_pipe):
    """An image is a one-frame video to the VAE; the latent is normalised as WanPipeline decodes it back
    (`latents / (1 / std) + mean`); t is uniform over 1..1000, noisy = (1 - t/1000) x0 + t/1000 noise, target =
    noise - x0, and the transformer gets t as the pipeline passes it."""
    pipe, scheduler = wan_pipe, Wan.noise_scheduler(wan_pipe)
    assert torch.equal(scheduler.timesteps.round(), torch.arange(1000, 0, -1).float())  # 1000..1 (float32)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    encoded = Wan.encode_pixels(pipe, pixels, 32, 32, torch.device("cpu"))
    shapes = Wan.conditioning_shapes(pipe.transformer, 32, 16)
    assert encoded["mean"].shape == (2, *shapes["mean"][1:]) == (2, 16, 1, 4, 4)
    embeds = Wan.encode_prompt(pipe, "a photo of sks dog", torch.device("cpu"), 16)["prompt_embeds"]
    assert embeds.shape == shapes["prompt_embeds"] and embeds[0, -1].abs().sum() == 0  # zeros past the prompt
    batch = {**encoded, "prompt_embeds": embeds.expand(2, -1, -1)}
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    torch.manual_seed(3)
    try:
        with torch.no_grad():
            pred, target = Wan.predict(pipe.transformer, pipe, scheduler, batch, torch.float32, 1.0)
    finally:
        hook.remove()
    torch.manual_seed(3)  # by hand, in the same order: latent sample, noise, timesteps
    sample = encoded["mean"] + encoded["std"] * torch.randn_like(encoded["mean"])
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (pipe.vae.config.latents_mean,
                                                               pipe.vae.config.latents_std))
    x0 = (sample - mean) / std
    noise = torch.randn_like(x0)
    t = scheduler.timesteps[torch.randint(0, 1000, (2,))]
    sigma = (t / 1000).view(2, 1, 1, 1, 1)
    t = t.round()  # the whole timestep, as drawn
    (call,) = calls
    assert torch.equal(call["timestep"], t) and torch.equal(call["encoder_hidden_states"], batch["prompt_embeds"])
    assert torch.allclose(call["hidden_states"], (1 - sigma) * x0 + sigma * noise, atol=1e-5)
    assert torch.allclose(target, (noise - x0).flatten(1, 2), atol=1e-5)
    with torch.no_grad():
        direct = pipe.transformer(hidden_states=call["hidden_states"], timestep=t,
                                  encoder_hidden_states=batch["prompt_embeds"], return_dict=False)[0]
    assert torch.equal(pred, direct.flatten(1, 2)) and pred.shape == (2, 16, 4, 4)  # (b, c x frames, h, w)
    assert torch.allclose(x0 / (1.0 / std) + mean, sample, atol=1e-5)  # as WanPipeline decodes it


@pytest.fixture(scope="module", ids=lambda p: "-".join(p),
                params=[("tiny", "lora"), pytest.param(("wide", "ortho_lora"), marks=pytest.mark.slow)])
def wan_checkpoint(request, tiny_wan, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny Wan or of the wide one (3 blocks, 3 heads of 8), with the
    metadata our runs write, and the pipeline it is for."""
    from tlora.families.pipelines import load_pipeline

    model, trainer_type = request.param
    folder = tiny_wan if model == "tiny" else Wan.tiny_model(tmp_path_factory.mktemp("wide-wan"), 1, wide=True)
    pipe = load_pipeline(str(folder), "none")
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    checkpoint = tmp_path_factory.mktemp(f"wan_{model}_{trainer_type}") / "checkpoint-10"
    save_weights(adapters.state_dict(), checkpoint,
                 adapters.settings.to_metadata() | Wan.model_metadata(pipe.transformer))
    tlora.unload(pipe)
    return pipe, checkpoint


def tlora_output(pipe, checkpoint, inputs: dict, t: int) -> torch.Tensor:
    tlora.load(pipe, checkpoint)
    try:
        with torch.no_grad():
            return pipe.transformer(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]
    finally:
        tlora.unload(pipe)


def test_the_diffusers_export_loads_in_wan_and_equals_the_tlora(wan_checkpoint, tmp_path):
    """WanPipeline.load_lora_weights reads `--format diffusers` and gives the T-LoRA's output with that mask:
    --mask full at t = 0, --mask timestep:600 at 600."""
    from tlora.interop.exporting import main

    pipe, checkpoint = wan_checkpoint
    transformer, inputs = pipe.transformer, wan_inputs(pipe.transformer, 1, 0)
    for mask, t in (("full", 0), ("timestep:600", 600)):
        out = tmp_path / f"diffusers_{t}.safetensors"
        assert main([str(checkpoint), "--format", "diffusers", "--out", str(out), "--mask", mask]) == 0
        expected = tlora_output(pipe, checkpoint, inputs, t)
        pipe.load_lora_weights(str(out), adapter_name="export")
        try:
            with torch.no_grad():
                got = transformer(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]
            pipe.disable_lora()
            with torch.no_grad():
                base = transformer(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]
        finally:
            pipe.enable_lora()
            pipe.delete_adapters("export")
        assert (got - expected).abs().max() <= 1e-5, mask
        assert (base - expected).abs().max() > 1e-3


def test_the_kohya_export_merged_as_comfyui_merges_it_equals_the_tlora(wan_checkpoint, tmp_path):
    """`--format kohya` added to the weights as ComfyUI does (comfy/weight_adapter/lora.py calculate_weight:
    W += strength * alpha / rank * up @ down, strength 1) on the modules its names map to gives the T-LoRA's
    output. (diffusers reads attention-only `lora_unet_` Wan files not at all: its musubi-tuner converter wants
    the FFN layers too; `--format diffusers` is its file.)"""
    from tlora.interop.exporting import main

    pipe, checkpoint = wan_checkpoint
    transformer, inputs = pipe.transformer, wan_inputs(pipe.transformer, 1, 0)
    names = Wan.original_names([layer.path for layer in Wan.layers(transformer)])
    linears = {kohya.key(name): transformer.get_submodule(path) for path, name in names.items()}
    by_key = {key: getattr(linear, "base_layer", linear) for key, linear in linears.items()}  # under a peft layer
    for mask, t in (("full", 0), ("timestep:600", 600)):
        out = tmp_path / f"kohya_{t}.safetensors"
        assert main([str(checkpoint), "--format", "kohya", "--out", str(out), "--mask", mask]) == 0
        weights, _ = read_weights(out)
        expected = tlora_output(pipe, checkpoint, inputs, t)
        before = {key: module.weight.detach().clone() for key, module in by_key.items()}
        try:
            with torch.no_grad():
                for key in {k.split(".")[0] for k in weights}:
                    up, down = weights[f"{key}.lora_up.weight"], weights[f"{key}.lora_down.weight"]
                    by_key[key].weight += weights[f"{key}.alpha"] / down.shape[0] * torch.mm(up, down)
                got = transformer(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]
        finally:
            with torch.no_grad():
                for key, module in by_key.items():
                    module.weight.copy_(before[key])
        assert (got - expected).abs().max() <= 1e-5, mask


def test_the_kohya_file_has_only_keys_comfyui_maps_for_wan(wan_checkpoint, tmp_path):
    """Every layer of `--format kohya` is one ComfyUI maps for Wan 2.1 (tests/comfyui_keys/wan.json, the published
    30 blocks; the tiny models have fewer), one per projection of each block's self_attn and cross_attn, with the
    rows of ComfyUI's q, k, v, o (dim x dim: no fused layer)."""
    from tlora.interop.exporting import main

    pipe, checkpoint = wan_checkpoint
    out = tmp_path / "kohya.safetensors"
    assert main([str(checkpoint), "--format", "kohya", "--out", str(out)]) == 0
    weights, meta = read_weights(out)
    comfy = json.loads((COMFY / "wan.json").read_text())
    layers = {key.split(".")[0] for key in weights}
    blocks = pipe.transformer.config.num_layers
    assert layers <= set(comfy["keys"]) and len(layers) == blocks * 2 * 4
    assert {f"lora_unet_blocks_{blocks - 1}_cross_attn_o", "lora_unet_blocks_0_self_attn_q"} <= layers
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert all(weights[f"{layer}.lora_up.weight"].shape[0] == dim for layer in layers)
    assert all(weights[f"{layer}.lora_down.weight"].shape[1] == dim for layer in layers)  # text_dim 32 goes to k, v
    assert meta["ss_base_model_version"] == "wan"


def test_the_comfyui_fixture_is_what_its_script_derives():
    spec = importlib.util.spec_from_file_location("derive_wan", COMFY / "derive_wan.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    comfy = json.loads((COMFY / "wan.json").read_text())
    keys = sorted(k for w in derive.state_dict_weights(derive.BLOCKS) for k in derive.lora_keys(w))
    assert comfy["keys"] == keys and len(keys) == 30 * 2 * 4 * 2
    assert comfy["source"].startswith("Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py")
    assert derive.BLOCKS == Wan.architectures["wan2.1-t2v-1.3b"]["transformer"][2]["num_layers"]


def test_wan_2_2_per_token_timestep_models_are_refused(wan_pipe):
    """Wan 2.2 TI2V-5B's WanPipeline (expand_timesteps: a timestep per token) is refused; Wan 2.2 A14B's two experts
    are test_wan22's."""
    ti2v = WanPipeline(**wan_pipe.components, expand_timesteps=True)
    with pytest.raises(UsageError, match="Wan 2.2 model with per-token timesteps") as err:
        Wan.prepare(ti2v, torch.float32)
    assert_helpful(str(err.value))


def test_videos_are_saved_beside_their_first_frame(tmp_path, monkeypatch):
    """Without an mp4 writer: a GIF, its frames as PNG and a contact sheet, said in one note; an image (one frame,
    or an image pipeline's) gets none."""
    monkeypatch.setattr(video, "_mp4_writer", lambda: None)
    monkeypatch.setattr(video, "_said", False)
    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(5)]
    first = frames[0].copy()
    first.video_frames = frames
    with pytest.warns(Note, match="pip install imageio-ffmpeg") as said:
        assert video.save_videos([first, Image.new("RGB", (32, 32))], tmp_path) == [tmp_path / "0.gif"]
        video.save_videos([first], tmp_path / "again")
    assert len(said) == 1
    with Image.open(tmp_path / "0.gif") as gif:
        assert gif.n_frames == 5
    assert sorted(p.name for p in (tmp_path / "0_frames").iterdir()) == [f"{i:03d}.png" for i in range(5)]
    with Image.open(tmp_path / "0_sheet.png") as sheet:
        assert sheet.size == (3 * 32, 2 * 32)  # 5 frames, 3 to a row
    assert not (tmp_path / "1.gif").exists()


def test_num_frames_is_checked_against_the_family():
    assert video.frames_kwargs("--num_frames", None, Wan) == {}
    assert video.frames_kwargs("--num_frames", 5, Wan) == {"num_frames": 5}
    for bad, fix in ((6, "pass e.g. 5"), (0, "pass e.g. 1")):
        with pytest.raises(UsageError, match=fix) as err:
            video.frames_kwargs("--num_frames", bad, Wan)
        assert_helpful(str(err.value))
    with pytest.raises(UsageError, match="sdxl makes images: drop the flag"):
        video.frames_kwargs("--num_frames", 5, FAMILIES["sdxl"])


def test_wan_trains_at_480_px_and_validates_with_one_frame_unless_asked(tiny_wan, tiny_sdxl, wan_pipe, image_dir,
                                                                       tmp_path, monkeypatch):
    """Wan 2.1 1.3B's native 480p is train.py's default --resolution for Wan; validation samples one frame (the
    pipeline's 81 at every checkpoint would outlast the training) unless --validation_num_frames asks for more."""
    import contextlib
    from types import SimpleNamespace

    from tlora.train import trainer
    from tlora.train.options import parse_args

    def options(*extra: str):
        argv = train_args(tiny_wan, image_dir, tmp_path / "out", "--trainer_class", "wan_tlora",
                          "--validation_prompts", "a {0}", *extra)
        return parse_args([a for a in argv if a not in ("--resolution", "64")])

    def validation_call(opts) -> dict:
        seen = []
        monkeypatch.setattr(trainer.generation, "run", lambda pipe, prompts, cfg, name: seen.append(cfg) or {})
        monkeypatch.setattr(trainer, "log_images", lambda *args: None)
        accelerator = SimpleNamespace(is_main_process=True, autocast=contextlib.nullcontext)
        fake = SimpleNamespace(opts=opts, family=Wan, accelerator=accelerator, model=torch.nn.Linear(1, 1),
                               device=torch.device("cpu"), pipe=wan_pipe)
        trainer.Trainer.validate(fake, tmp_path / "checkpoint-2", 2)
        return seen[0].call_kwargs

    opts = options()
    assert (opts.resolution, opts.validation_num_frames) == (480, 1) and opts.resolution % Wan.resolution_multiple == 0
    assert validation_call(opts)["num_frames"] == 1
    assert validation_call(options("--validation_num_frames", "9"))["num_frames"] == 9
    with pytest.raises(UsageError, match="--validation_num_frames must be 4k [+] 1 .* pass e.g. 5") as err:
        options("--validation_num_frames", "6")
    assert_helpful(str(err.value))
    with pytest.raises(UsageError, match="--resolution must be a multiple of 16 .* pass one such as 480"):
        options("--resolution=40")
    with pytest.raises(UsageError, match="--validation_num_frames is for video models; sdxl makes images: drop"):
        parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "out", "--validation_num_frames", "5"))


@pytest.mark.slow
def test_train_py_trains_wan_and_inference_saves_videos(tiny_wan, image_dir, tmp_path):
    """Video samples beside the first frames (both trainer types train in test_family_recipes)."""
    import inference
    import train

    out = tmp_path / "out"
    assert train.main(with_flags(train_args(tiny_wan, image_dir, out), (
        "--trainer_type", "lora", "--trainer_class", "wan_tlora", "--num_train_epochs", "2",
        "--max_sequence_length", "16", "--mixed_precision", "no"))) == 0
    (folder,) = out.iterdir()
    hp = yaml.safe_load((folder / "logs" / "hparams.yml").read_text())
    assert (hp["family"], hp["trainer_type"], hp["trainer_class"], hp["optimizer"]) == (
        "wan", "lora", "wan_tlora", "adamw")
    weights, meta = read_weights(folder / "checkpoint-2")
    assert meta["family"] == "wan" and {k.split(".processor.")[0] for k in weights} == {
        f"blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)}
    assert inference.main(["--config_path", str(folder / "logs/hparams.yml"), "--checkpoint_idx", "2", "--prompts",
                           "a {0} riding a bike", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
                           "--height", "32", "--width", "32", "--num_frames", "5"]) == 0
    samples = folder / "checkpoint-2/samples/ns2_gs5.0/version_0/a sks riding a bike"
    assert {"0.png", "0_sheet.png", "grid.png"} <= {p.name for p in samples.iterdir()}
    assert (samples / "0.gif").is_file() or (samples / "0.mp4").is_file()
    with Image.open(samples / "0.png") as first:
        assert first.size == (32, 32)
