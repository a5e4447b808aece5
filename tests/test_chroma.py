"""Chroma: what is its own (the timestep and text mask as ChromaPipeline passes them, the flow-matching loss with the
mask, its files told from FLUX.1's, exports ComfyUI and diffusers load, the command line); what it shares with the
other families is in test_families."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import ChromaImg2ImgPipeline, ChromaPipeline, ChromaTransformer2DModel
from PIL import Image

import tlora
from tlora.families import of_keys
from tlora.families.chroma import Chroma
from tlora.method.adapters import rank_mask
from tlora.runs.weights import save_weights
from tlora.train.conditioning import Conditioning
from tlora.train.objective import diffusion_loss

from helpers import chroma_inputs, make_image, perturb, read_weights, tlora_and_export_outputs

KEYS = Path(__file__).parent / "comfyui_keys"


def _derive(name: str):
    spec = importlib.util.spec_from_file_location(name, KEYS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recorded(pipe, **call) -> list[dict]:
    """The keyword arguments of every transformer call of one pipeline call."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        pipe(prompt="a photo of sks dog", **{"num_inference_steps": 4, "height": 64, "width": 64,
                                             "max_sequence_length": 16, "output_type": "latent",
                                             "generator": torch.Generator().manual_seed(0), **call})
    finally:
        hook.remove()
    return calls


def test_the_pipelines_pass_t_over_1000_and_the_mask_is_r_of_t(chroma_pipe, tmp_path):
    """ChromaPipeline and ChromaImg2ImgPipeline call the transformer twice a step (prompt, negative prompt) with
    the scheduler's t / 1000, which diffusion_t maps back to t; the T-LoRA's mask there is r(t)."""
    img2img = ChromaImg2ImgPipeline(**chroma_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = Image.open(make_image(tmp_path / "image.png", (64, 64)))
    adapters = tlora.attach(chroma_pipe.transformer, tlora.TLoRASettings("lora", 8, 2))
    masks = []
    hook = chroma_pipe.transformer.register_forward_pre_hook(lambda *_: masks.append(adapters.state.mask.clone()))
    try:
        for pipe, extra in ((chroma_pipe, {}), (img2img, {"image": image, "strength": 0.6})):
            masks.clear()
            calls = _recorded(pipe, **extra)
            steps = pipe.scheduler.timesteps[-(len(calls) // 2):].repeat_interleave(2)  # img2img: the last ones
            assert len(calls) == len(steps) >= 4  # true CFG: a second call, not a doubled batch
            assert all(len(kwargs["hidden_states"]) == 1 for kwargs in calls)
            for kwargs, step, mask in zip(calls, steps, masks):
                assert torch.equal(kwargs["timestep"], (step / 1000).expand(1))
                assert torch.allclose(Chroma.diffusion_t(kwargs["timestep"]), step.float(), atol=1e-3)
                assert Chroma.scheduler_t(step) == Chroma.diffusion_t(kwargs["timestep"])[0]
                expected = rank_mask(Chroma.scheduler_t(step)[None], 1000, 8, 2, rule=adapters.settings.rule)
                assert torch.equal(mask, expected.expand(len(mask), -1))
            assert masks[0].sum() < masks[-1].sum()
    finally:
        hook.remove()
        tlora.unload(chroma_pipe)
    t = torch.arange(0, 1001, dtype=torch.float32)
    assert torch.equal(Chroma.diffusion_t(t / 1000), t)  # integer training timesteps come back exactly


def test_training_conditions_the_transformer_as_the_pipeline_does(chroma_pipe):
    """encode_prompt gives the T5 embeddings and text mask (the prompt's tokens and one padding token) that
    ChromaPipeline passes, and the image tokens are appended to the mask as there."""
    (call,) = _recorded(chroma_pipe, guidance_scale=1.0, num_inference_steps=1)
    ours = Chroma.encode_prompt(chroma_pipe, "a photo of sks dog", torch.device("cpu"), 16)
    assert torch.equal(call["encoder_hidden_states"], ours["prompt_embeds"])
    mask = ours["prompt_attention_mask"]
    tokens = chroma_pipe.tokenizer("a photo of sks dog").input_ids
    assert mask.shape == (1, 16) and mask.sum() == len(tokens) + 1 < 16
    assert torch.equal(call["attention_mask"], torch.cat([mask, torch.ones(1, 16)], 1))
    shapes = Chroma.conditioning_shapes(chroma_pipe.transformer, 64, 16)
    assert shapes["prompt_embeds"] == tuple(ours["prompt_embeds"].shape) and shapes["prompt_attention_mask"] == (1, 16)


def test_the_loss_is_the_flow_matching_loss_with_the_text_mask(chroma_pipe, image_dir):
    """diffusion_loss equals a hand-written flow-matching loss with the same random numbers, the transformer given
    the text mask (without it the loss differs)."""
    transformer, vae = chroma_pipe.transformer, chroma_pipe.vae
    scheduler = Chroma.noise_scheduler(chroma_pipe)
    batch = Conditioning(Chroma, chroma_pipe, [image_dir / "00.png"], "a photo of sks dog", 64, torch.device("cpu"),
                         max_sequence_length=16).batch({"instance": torch.tensor([0])})
    assert set(batch) == {"mean", "std", "prompt_embeds", "prompt_attention_mask"}
    torch.manual_seed(3)
    with torch.no_grad():
        loss = diffusion_loss(Chroma, transformer, chroma_pipe, scheduler, batch, torch.float32, None)
    torch.manual_seed(3)
    sample = batch["mean"] + batch["std"] * torch.randn_like(batch["mean"])
    x0 = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn_like(x0)
    t = torch.linspace(1000, 1, 1000)[torch.randint(0, 1000, (1,))]  # the training timesteps: 1000..1, unshifted
    sigma = t / 1000
    noisy = (1 - sigma) * x0 + sigma * noise
    packed = noisy.reshape(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)  # 2x2 patches
    ids = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    inputs = dict(hidden_states=packed, timestep=sigma, encoder_hidden_states=batch["prompt_embeds"],
                  txt_ids=torch.zeros(16, 3), img_ids=torch.cat([torch.zeros(16, 1), ids], 1), return_dict=False)
    mask = torch.cat([batch["prompt_attention_mask"], torch.ones(1, 16)], 1)
    unpack = lambda pred: pred.reshape(1, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 8)  # noqa: E731
    with torch.no_grad():
        pred = unpack(transformer(attention_mask=mask, **inputs)[0])
        unmasked = unpack(transformer(**inputs)[0])
    target = noise - x0
    assert torch.allclose(loss, ((pred - target) ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, ((unmasked - target) ** 2).mean(), rtol=1e-4)


def test_gradient_checkpointing_keeps_the_text_mask_in_the_single_blocks(borrowed_chroma_pipe, image_dir):
    """diffusers' checkpointed ChromaTransformer2DModel.forward leaves the mask out of the single blocks; training
    gives it to them, so the loss and the adapters' gradients (recomputed in backward) are those without
    checkpointing, as sampling computes them; the checkpointing function is the model's own again after the call."""
    pipe = borrowed_chroma_pipe
    transformer, scheduler = pipe.transformer, Chroma.noise_scheduler(pipe)
    adapters = tlora.attach(pipe, tlora.TLoRASettings("lora", 4, 2))
    perturb(adapters, seed=2)
    batch = Conditioning(Chroma, pipe, [image_dir / "00.png"], "a photo of sks dog", 64, torch.device("cpu"),
                         max_sequence_length=16).batch({"instance": torch.tensor([0])})
    assert not batch["prompt_attention_mask"].all()  # padding to mask
    results = []
    try:
        for checkpointing in (False, True):
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            own = getattr(transformer, "_gradient_checkpointing_func", None)
            torch.manual_seed(3)
            loss = diffusion_loss(Chroma, transformer, pipe, scheduler, batch, torch.float32, None)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in adapters.trainable_parameters()]))
            assert getattr(transformer, "_gradient_checkpointing_func", None) is own
            for p in adapters.trainable_parameters():
                p.grad = None
    finally:
        transformer.disable_gradient_checkpointing()
    (plain, plain_grads), (checkpointed, grads) = results
    assert torch.allclose(plain, checkpointed, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain_grads, grads))


def test_keys_tell_chroma_from_flux_by_the_record(chroma_pipe, flux_pipe, tmp_path):
    """Chroma's keys are FLUX.1's (not FLUX.2's): the metadata says which; a file without it is assumed FLUX.1 on
    its own, read as Chroma on a Chroma pipeline; each pipeline refuses the other's recorded files."""
    adapters = tlora.attach(chroma_pipe.transformer, tlora.TLoRASettings("lora", 4, 2))
    weights, settings = adapters.state_dict(), adapters.settings
    tlora.unload(chroma_pipe)
    assert of_keys(weights) == ["flux", "chroma"]
    save_weights(weights, tmp_path / "chroma", settings.to_metadata())
    assert tlora.read(tmp_path / "chroma").settings.family == "chroma"
    with pytest.raises(ValueError, match="trained on chroma; this is a flux model"):
        tlora.load(flux_pipe, tmp_path / "chroma")
    save_weights(weights, tmp_path / "unsaid", {"trainer_type": "lora", "lora_rank": 4})
    with pytest.warns(tlora.AssumedSetting, match="its keys fit flux and chroma models and nothing records which"):
        assert tlora.read(tmp_path / "unsaid").settings.family == "flux"
    assert tlora.read(tmp_path / "unsaid", family="chroma", quiet=True).settings.family == "chroma"
    flux = tlora.attach(flux_pipe.transformer, tlora.TLoRASettings("lora", 4, 2))
    save_weights(flux.state_dict(), tmp_path / "flux", flux.settings.to_metadata())
    tlora.unload(flux_pipe)
    with pytest.raises(ValueError, match="trained on flux; this is a chroma model"):
        tlora.load(chroma_pipe, tmp_path / "flux")


def other_chroma(pipe) -> ChromaPipeline:
    """A Chroma built apart from the tiny one: other widths, heads and block counts, on the same text encoder and
    VAE."""
    torch.manual_seed(5)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16, approximator_hidden_dim=24, approximator_layers=2,
    )
    other = ChromaPipeline(**{**pipe.components, "transformer": transformer})
    other.set_progress_bar_config(disable=True)
    return other


@pytest.fixture(scope="module", params=[("tiny", "lora"), ("other", "ortho_lora")], ids=lambda p: "-".join(p))
def chroma_checkpoint(request, tiny_chroma, chroma_pipe, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny Chroma (a pipeline of its own) or of the other one."""
    from tlora.families.pipelines import load_pipeline

    model, trainer_type = request.param
    pipe = load_pipeline(str(tiny_chroma), "none") if model == "tiny" else other_chroma(chroma_pipe)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    folder = tmp_path_factory.mktemp(f"chroma_{model}_{trainer_type}") / "checkpoint-10"
    save_weights(adapters.state_dict(), folder, adapters.settings.to_metadata())
    tlora.unload(pipe)
    return pipe, folder


def _outputs(pipe, checkpoint, out: Path, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the T-LoRA's output at t, the exported file's in the stock loader, the base model's)."""
    transformer, inputs, step = pipe.transformer, chroma_inputs(pipe.transformer, 1, 0), torch.tensor([t / 1000])
    return tlora_and_export_outputs(pipe, checkpoint, out,
                                    lambda: transformer(timestep=step, return_dict=False, **inputs)[0])


def test_the_diffusers_export_loads_in_the_chroma_pipeline_and_equals_the_tlora(chroma_checkpoint, tmp_path):
    """`--mask full` is the T-LoRA at t = 0 (every component), `timestep:500` at t = 500, in ChromaPipeline's own
    load_lora_weights. (Its kohya reader knows only the published widths: the kohya file is checked below.)"""
    from tlora.interop.exporting import main

    pipe, checkpoint = chroma_checkpoint
    for mask, t in (("full", 0), ("timestep:500", 500)):
        out = tmp_path / f"diffusers_{t}.safetensors"
        assert main([str(checkpoint), "--format", "diffusers", "--out", str(out), "--mask", mask]) == 0
        expected, got, base = _outputs(pipe, checkpoint, out, t)
        assert (got - expected).abs().max() <= 1e-5, mask
        assert (base - expected).abs().max() > 1e-3


def test_the_kohya_file_has_only_keys_comfyui_maps_for_chroma(chroma_checkpoint, tmp_path):
    """Every layer of the kohya file (and of the diffusers one) is a key ComfyUI maps for Chroma1-HD
    (comfyui_keys/chroma.json, its rules re-stated in derive_chroma.py), with the rows ComfyUI's weight has at this
    model's size; through ComfyUI's own maps both files make the same update of each weight (q, k, v fused, in
    linear1 only ComfyUI's linear1_qkv slice non-zero)."""
    from tlora.interop.exporting import main

    pipe, checkpoint = chroma_checkpoint
    published = json.loads((KEYS / "chroma.json").read_text())
    assert published["model"] == "lodestones/Chroma1-HD" and published["source"].startswith("Comfy-Org/ComfyUI@a125cd8")
    derive, c = _derive("derive_flux"), pipe.transformer.config
    config = derive.comfy_config(dict(c))
    hidden = config["hidden_size"]
    keys, rows = derive.key_map(config, 3 * hidden + 4 * hidden)  # ChromaSingleTransformerBlock: mlp_ratio 4
    assert set(keys) <= set(published["keys"])  # the tiny model's blocks are among the published ones
    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("kohya", "diffusers")}
    for fmt, out in files.items():
        assert main([str(checkpoint), "--format", fmt, "--out", str(out), "--mask", "timestep:300"]) == 0
    kohya, meta = read_weights(files["kohya"])
    assert meta["ss_base_model_version"] == "chroma"
    layers = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}
    assert layers == {f"lora_unet_double_blocks_{i}_{n}" for i in range(c.num_layers)
                      for n in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(c.num_single_layers)}
    assert layers <= set(keys)
    assert set(kohya) == {f"{name}.{part}" for name in layers for part in ("lora_down.weight", "lora_up.weight",
                                                                            "alpha")}
    fused = {keys[name]: kohya[f"{name}.lora_up.weight"] @ kohya[f"{name}.lora_down.weight"]
             * (kohya[f"{name}.alpha"] / kohya[f"{name}.lora_down.weight"].shape[0]) for name in layers}
    assert all(delta.shape[0] == rows[weight] for weight, delta in fused.items())
    diffusers, _ = read_weights(files["diffusers"])
    modules = {k.rsplit(".", 2)[0] for k in diffusers}
    assert modules <= set(keys)  # transformer.<diffusers module>
    mapped = {weight: torch.zeros_like(delta) for weight, delta in fused.items()}
    for module in modules:  # each diffusers layer where ComfyUI puts it: a whole weight or a slice of one
        to = keys[module]
        weight, (dim, start, length) = to if isinstance(to, tuple) else (to, (0, 0, rows[to]))
        mapped[weight].narrow(dim, start, length).add_(
            diffusers[f"{module}.lora_B.weight"] @ diffusers[f"{module}.lora_A.weight"])
    for weight, delta in fused.items():
        assert torch.allclose(delta, mapped[weight], atol=1e-6), weight
        if weight.endswith("linear1.weight"):
            _, (_, start, length) = keys[weight.replace(".linear1.weight", ".linear1_qkv")]
            assert (start, length) == (0, 3 * hidden) and delta[length:].abs().sum() == 0  # the MLP rows
    assert all(delta.abs().sum() > 0 for delta in fused.values())


def test_the_estimator_knows_chroma1_hd():
    from tlora.families.architectures import empty_pipeline

    pipe = empty_pipeline("chroma1-hd", torch.bfloat16)
    transformer = pipe.transformer
    assert Chroma.owns(transformer) and transformer.inner_dim == 3072
    assert len(Chroma.layers(transformer)) == 19 * 7 + 38 * 3  # 247 adapters
    params = sum(p.numel() for p in transformer.parameters())
    assert 8.5e9 < params < 9.0e9  # Chroma1-HD: 8.9B

