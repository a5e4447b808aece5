"""Z-Image: what is its own (the reversed timestep the pipelines pass, the negated output, latents and prompts as
per-sample lists, ComfyUI's fused qkv, the command line); what it shares with the other families is in
test_families."""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

import tlora
from tlora.families import of_keys
from tlora.families.pipelines import load_pipeline
from tlora.families.zimage import ZImage
from tlora.method.adapters import rank_mask
from tlora.runs.weights import save_weights

from helpers import perturb, read_weights, zimage_inputs

KEYS = Path(__file__).parent / "comfyui_keys"
CALL = {"height": 64, "width": 64, "max_sequence_length": 32, "generator": None}


def call(pipe, prompt="a photo of sks dog", **kwargs):
    return pipe(prompt, **{**CALL, "generator": torch.Generator().manual_seed(0), **kwargs})


def ideal(x0: torch.Tensor):
    """A transformer's forward that meets the training objective exactly for one clean latent x0: at
    noisy = (1 - sigma) x0 + sigma noise it returns -(noise - x0) = -(noisy - x0) / sigma, sigma = 1 - its t (a
    batch larger than x0: CFG's doubled batch)."""
    def forward(x, t, cap_feats, return_dict=True, **kwargs):
        return ([-(xi - x0[i % len(x0)].unsqueeze(1)) / (1 - ti) for i, (xi, ti) in enumerate(zip(x, t))],)
    return forward


@pytest.mark.parametrize("guidance", [0.0, 5.0], ids=["no-cfg", "cfg"])
def test_the_pipeline_passes_1000_minus_t_over_1000_and_the_mask_is_r_of_t(borrowed_zimage_pipe, guidance):
    """At every denoising step ZImagePipeline calls the transformer with (1000 - t) / 1000 (CFG: a doubled batch);
    diffusion_t maps it back to the scheduler's t, and the mask is r(t) of that t."""
    pipe = borrowed_zimage_pipe
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1].clone(), adapters.state.mask.clone())), with_kwargs=True)
    try:
        call(pipe, num_inference_steps=6, guidance_scale=guidance, output_type="latent")
    finally:
        hook.remove()
    steps = pipe.scheduler.timesteps
    assert len(seen) == len(steps) == 6 and steps[0] == 1000  # pure noise first: the transformer gets 0
    for (passed, mask), step in zip(seen, steps):
        rows = 2 if guidance else 1
        assert torch.equal(passed, ((1000 - step) / 1000).expand(rows))
        assert torch.equal(ZImage.diffusion_t(passed), ZImage.scheduler_t(step).expand(rows))
        assert (ZImage.diffusion_t(passed) - step).abs().max() < 5e-4
        expected = rank_mask(torch.tensor([step.item()]), 1000, 8, 2, rule=adapters.settings.rule)
        assert torch.equal(mask, expected.expand(rows, -1))
    assert seen[0][1].sum() < seen[-1][1].sum()  # fewer components at the noisy start


def test_a_model_that_meets_the_training_objective_denoises_in_the_stock_pipeline(borrowed_zimage_pipe,
                                                                                  monkeypatch):
    """The output sign and timestep as predict trains them are the ones the pipeline samples with: a transformer
    whose negated output is noise - x0 (predict's target) takes the stock pipeline's Euler steps to x0 exactly."""
    pipe = borrowed_zimage_pipe
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(pipe.transformer, "forward", ideal(x0))
    for guidance in (0.0, 5.0):
        latents = call(pipe, num_inference_steps=4, guidance_scale=guidance, output_type="latent").images
        assert (latents - x0).abs().max() < 1e-4, guidance


def test_predict_is_the_objective_recomputed_by_hand(borrowed_zimage_pipe, monkeypatch):
    """Flow matching with t from the scheduler's (shifted) training timesteps: the transformer gets each sample's
    noisy latent (c, 1, h, w), (1000 - t) / 1000 and its prompt's real tokens only (the instance and class prompts
    differ in length), as ZImagePipeline calls it; the prediction is its negated output, the target noise - x0."""
    pipe = borrowed_zimage_pipe
    scheduler = ZImage.noise_scheduler(pipe)
    prompts = ["a photo of sks dog", "a photo of dog riding a red bike"]
    encoded = [ZImage.encode_prompt(pipe, p, torch.device("cpu"), 32) for p in prompts]
    g = torch.Generator().manual_seed(1)
    batch = {"mean": torch.randn(2, 16, 8, 8, generator=g), "std": torch.rand(2, 16, 8, 8, generator=g) * 0.1,
             **{k: torch.cat([e[k] for e in encoded]) for k in encoded[0]}}
    torch.manual_seed(0)
    pred, target = ZImage.predict(pipe.transformer, pipe, scheduler, batch, torch.float32, 1.0)

    torch.manual_seed(0)
    vae = pipe.vae.config
    latents = ((batch["mean"] + batch["std"] * torch.randn(2, 16, 8, 8)) - vae.shift_factor) * vae.scaling_factor
    noise = torch.randn_like(latents)
    t = scheduler.timesteps[torch.randint(0, 1000, (2,))]
    sigma = (t / 1000)[:, None, None, None]
    noisy = (1 - sigma) * latents + sigma * noise
    own = [pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=32)[0][0] for p in prompts]
    assert len(own[0]) != len(own[1])
    with torch.no_grad():
        out = pipe.transformer([n.unsqueeze(1) for n in noisy], (1000 - t) / 1000, own, return_dict=False)[0]
    assert torch.equal(target, noise - latents)
    assert (pred - -torch.stack(out).squeeze(2)).abs().max() < 1e-5
    assert t.min() > 0 and not torch.equal(t, t.round())  # the shifted timesteps, not integers

    monkeypatch.setattr(pipe.transformer, "forward", ideal(latents))
    torch.manual_seed(0)
    pred, target = ZImage.predict(pipe.transformer, pipe, scheduler, batch, torch.float32, 1.0)
    assert (pred - target).abs().max() < 1e-4  # the model that denoises in the pipeline has zero loss


def test_encodings_have_the_shapes_the_estimator_traces(zimage_pipe):
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    encoded = ZImage.encode_pixels(zimage_pipe, pixels, 64, 64, torch.device("cpu"))
    encoded |= ZImage.encode_prompt(zimage_pipe, "a photo of sks dog", torch.device("cpu"), 32)
    shapes = ZImage.conditioning_shapes(zimage_pipe.transformer, 64, 32)
    assert {k: tuple(encoded[k].shape) for k in shapes} == shapes
    assert encoded["prompt_mask"].shape == (1, 32) and 0 < encoded["prompt_mask"].sum() < 32


@pytest.fixture(scope="module", ids=lambda p: "-".join(p),
                params=[("tiny", "lora"), pytest.param(("wide", "ortho_lora"), marks=pytest.mark.slow)])
def zimage_checkpoint(request, tiny_zimage, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny Z-Image or of the wide one (three heads of 8, two refiner
    blocks of each kind), on a pipeline of its own, with the metadata our runs write."""
    model, trainer_type = request.param
    folder = tiny_zimage if model == "tiny" else request.getfixturevalue("wide_zimage")
    pipe = load_pipeline(str(folder), "none")
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    checkpoint = tmp_path_factory.mktemp(f"zimage_{model}_{trainer_type}") / "checkpoint-10"
    save_weights(adapters.state_dict(), checkpoint,
                 adapters.settings.to_metadata() | ZImage.model_metadata(pipe.transformer))
    assert of_keys(adapters.state_dict()) == ["zimage"]
    tlora.unload(pipe)
    return pipe, checkpoint


def outputs(pipe, checkpoint, export, t):
    """The transformer's output (stacked) at scheduler timestep t: with the T-LoRA, with the exported LoRA through
    ZImagePipeline.load_lora_weights, and with neither."""
    inputs, step = zimage_inputs(pipe.transformer, 1, 0), torch.tensor([(1000 - t) / 1000])

    def run():
        with torch.no_grad():
            return torch.stack(pipe.transformer(t=step, return_dict=False, **inputs)[0])

    tlora.load(pipe, checkpoint)
    expected = run()
    tlora.unload(pipe)
    pipe.load_lora_weights(str(export), adapter_name="export")
    try:
        got = run()
        pipe.disable_lora()
        base = run()
    finally:
        pipe.enable_lora()
        pipe.delete_adapters("export")
    return expected, got, base


@pytest.mark.parametrize("mask, t", [("full", 0), ("timestep:999", 999), ("timestep:500", 500)])
def test_the_diffusers_export_loads_in_zimage_and_equals_the_tlora(zimage_checkpoint, tmp_path, mask, t):
    from tlora.interop.exporting import main

    pipe, checkpoint = zimage_checkpoint
    out = tmp_path / "lora.safetensors"
    assert main([str(checkpoint), "--format", "diffusers", "--out", str(out), "--mask", mask]) == 0
    expected, got, base = outputs(pipe, checkpoint, out, t)
    assert (got - expected).abs().max() <= 1e-5
    assert (base - expected).abs().max() > 1e-3
    weights, _ = read_weights(out)
    assert all(k.startswith("transformer.") and ".attention.to_" in k for k in weights)


def comfyui_keys() -> dict:
    """The committed fixture, checked to be what derive_zimage.py derives for the published config."""
    spec = importlib.util.spec_from_file_location("derive_zimage", KEYS / "derive_zimage.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    fixture = json.loads((KEYS / "zimage.json").read_text())
    weights = derive.state_dict_attention(30, 2)
    assert fixture["keys"] == sorted(derive.key_map(weights)) and len(fixture["keys"]) == 2 * 2 * (30 + 2 + 2)
    return fixture


def test_the_kohya_export_writes_only_keys_comfyui_maps_with_qkv_fused_exactly(zimage_checkpoint, tmp_path):
    """kohya: ComfyUI's NextDiT names (`lora_unet_layers_0_attention_qkv`, `..._out`), each key one ComfyUI maps;
    q, k, v fused into qkv whose (n_heads + 2 n_kv_heads) x head_dim rows are ComfyUI's JointAttention's, and
    each projection's update on its rows is the diffusers export's, exactly."""
    from tlora.interop.exporting import main

    pipe, checkpoint = zimage_checkpoint
    assert main([str(checkpoint), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main([str(checkpoint), "--format", "diffusers", "--out", str(tmp_path / "d.safetensors")]) == 0
    kohya, meta = read_weights(tmp_path / "k.safetensors")
    diffusers, _ = read_weights(tmp_path / "d.safetensors")
    keys = {k.split(".", 1)[0] for k in kohya}
    assert keys <= set(comfyui_keys()["keys"]) and meta["ss_base_model_version"] == "zimage"
    c = pipe.transformer.config
    attentions = [name for name, _ in pipe.transformer.named_modules() if name.endswith(".attention")]
    assert len(attentions) == 2 * c.n_refiner_layers + c.n_layers
    comfy = {"qkv": ("to_q", "to_k", "to_v"), "out": ("to_out.0",)}  # ComfyUI's Linear -> the projections in it
    assert keys == {"lora_unet_" + f"{a}.{linear}".replace(".", "_") for a in attentions for linear in comfy}
    qkv_rows = (c.n_heads + 2 * c.n_kv_heads) * (c.dim // c.n_heads)  # comfy/ldm/lumina/model.py:52
    for attention in attentions:
        for linear, projections in comfy.items():
            key = "lora_unet_" + f"{attention}.{linear}".replace(".", "_")
            down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
            update = up @ down * (kohya[f"{key}.alpha"] / len(down))
            assert update.shape == (qkv_rows if linear == "qkv" else c.dim, c.dim)
            for i, projection in enumerate(projections):
                module = f"transformer.{attention}.{projection}"
                own = diffusers[f"{module}.lora_B.weight"] @ diffusers[f"{module}.lora_A.weight"]
                assert (update[i * c.dim:(i + 1) * c.dim] - own).abs().max() < 1e-6, module


def test_the_fused_qkv_puts_each_projection_at_the_end_of_those_before_it_at_its_own_width():
    """Grouped-query attention (n_kv_heads < n_heads): k and v narrower than q; ComfyUI's qkv holds q, k, v one after
    the other, so each starts where the ones before it end and the layer is as wide as all three."""
    a = "layers.0.attention"
    widths = {f"{a}.to_q": 48, f"{a}.to_k": 16, f"{a}.to_v": 16, f"{a}.to_out.0": 48}
    qkv, out = ZImage.original_layers(widths, {})
    assert qkv == (f"{a}.qkv", 80, {f"{a}.to_q": 0, f"{a}.to_k": 48, f"{a}.to_v": 64})
    assert out == (f"{a}.out", 48, {f"{a}.to_out.0": 0})


@pytest.mark.parametrize("zimage_checkpoint", [("tiny", "ortho_lora")], indirect=True)
def test_sampling_at_the_pipelines_defaults_says_turbos_settings(zimage_checkpoint, tiny_zimage, image_dir, tmp_path):
    """ZImagePipeline's 50 steps at guidance 5 are the base model's; Z-Image-Turbo, the published model, is
    step-distilled for 9 steps without guidance: one note says what to pass, in inference.py unless both flags are
    given, and at train start when validation samples at the defaults."""
    import shutil

    import yaml

    from tlora.common.messages import Note
    from tlora.generate import inference
    from tlora.train.options import parse_args

    _, checkpoint = zimage_checkpoint
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoint-10")
    (run / "logs").mkdir()
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(tiny_zimage), "placeholder_token": "sks", "class_name": "dog"}))
    argv = ["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "10", "--prompts", "a {0}"]
    turbo = "Z-Image-Turbo is step-distilled for 9 steps at guidance 0: for it, pass --num_inference_steps 9 " \
            "--guidance_scale 0"
    for extra in ((), ("--num_inference_steps", "9")):
        with pytest.warns(Note) as said:
            inference.parse_args([*argv, *extra])
        assert [str(w.message) for w in said if "Turbo" in str(w.message)] == [
            f"ZImagePipeline's defaults, 50 steps at guidance 5, are for the base model; {turbo}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Note)
        inference.parse_args([*argv, "--num_inference_steps", "9", "--guidance_scale", "0"])
    train = ["--pretrained_model_name_or_path", str(tiny_zimage), "--train_data_dir", str(image_dir),
             "--output_dir", str(tmp_path / "out"), "--class_name", "dog", "--resolution", "64"]
    with pytest.warns(Note, match="validation samples at the defaults .* inference.py --num_inference_steps 9 "
                                  "--guidance_scale 0"):
        parse_args([*train, "--validation_prompts", "a {0}"])


def test_a_model_index_recording_is_distilled_false_gets_no_distilled_note(tiny_zimage, tiny_klein, monkeypatch):
    """The mechanism is the family's attribute (FLUX.2 [klein] may share it): its base models, whose model_index.json
    records is_distilled false, are sampled at the pipeline's defaults without a note."""
    from tlora.families.klein import Klein
    from tlora.generate.generation import distilled_defaults

    monkeypatch.setattr(Klein, "distilled_sampling", ("the distilled klein", 4, 1.0), raising=False)
    assert distilled_defaults(Klein, str(tiny_klein), None) is None
    assert distilled_defaults(ZImage, str(tiny_zimage), None)[1] == "--num_inference_steps 9 --guidance_scale 0"
    assert distilled_defaults(ZImage, str(tiny_zimage), None, True, True) is None


def test_no_authors_format_for_zimage(zimage_checkpoint, tmp_path, capsys):
    from tlora.interop.exporting import main

    _, checkpoint = zimage_checkpoint
    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert main([str(checkpoint), "--format", "authors", "--out", str(out)]) == 2 and not out.exists()
    assert "the authors released no code for it; use --format diffusers or kohya" in capsys.readouterr().err

