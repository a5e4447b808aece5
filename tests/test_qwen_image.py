"""Qwen-Image: what is its own (the timestep QwenImagePipeline passes, its prompt template, the flow-matching target
on the normalised one-frame latent, padded prompts, ComfyUI's keys for its exports, the command lines); what it
shares with the other families is in test_families."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import QwenImageImg2ImgPipeline, QwenImageTransformer2DModel

import tlora
from tlora.families import known_from_keys, of_keys
from tlora.families.qwen_image import PUBLISHED, QwenImage, prompt_as_called
from tlora.method.adapters import rank_mask
from tlora.runs.weights import save_weights
from tlora.train.conditioning import Conditioning

from helpers import perturb, qwen_image_inputs, read_weights, tlora_and_export_outputs

COMFY = Path(__file__).parent / "comfyui_keys"
PROMPT = "a photo of sks dog"


def test_the_pipeline_passes_t_over_1000_and_masks_by_r_of_t(borrowed_qwen_image_pipe):
    """QwenImagePipeline calls the transformer with the scheduler's t / 1000, twice a step (true CFG): diffusion_t
    gives t back (to 1/1000), scheduler_t is that of t, and each call's mask is r(t); sigma 1 is t = T."""
    pipe = borrowed_qwen_image_pipe
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["timestep"].clone(), adapters.state.mask.clone())), with_kwargs=True)
    try:
        pipe(prompt=PROMPT, negative_prompt=" ", num_inference_steps=5, height=64, width=64, max_sequence_length=16,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    steps = pipe.scheduler.timesteps.repeat_interleave(2)  # the prompt's call, then the negative prompt's
    assert len(seen) == len(steps) == 10 and steps[0] == 1000
    for (timestep, mask), t in zip(seen, steps):
        assert torch.equal(timestep, t[None] / 1000)
        paper_t = QwenImage.diffusion_t(timestep)
        assert torch.equal(paper_t, QwenImage.scheduler_t(t)[None]) and abs(paper_t - t) <= 5e-4
        assert torch.equal(mask, rank_mask(paper_t, 1000, 8, 2, rule=adapters.settings.rule))
    assert seen[0][1].sum() == 2 and seen[-1][1].sum() > 2  # min_rank at t = T


def test_the_template_prefix_is_the_34_tokens_the_pipeline_drops(qwen_image_pipe):
    """The tiny tokenizer reads QwenImagePipeline's template as Qwen2.5-VL's does: its system part and the user
    turn's start are the 34 tokens dropped, so the embeddings are the prompt and the template's 5 closing tokens."""
    pipe = qwen_image_pipe
    prefix = pipe.prompt_template_encode.split("{}")[0]
    tokens = pipe.tokenizer(prefix)["input_ids"]
    assert len(tokens) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(tokens[-3:]) == ["<|im_start|>", "user", "\u010a"]
    embeds, mask = pipe.encode_prompt(PROMPT, max_sequence_length=64)
    assert embeds.shape[1] == len(pipe.tokenizer(PROMPT)["input_ids"]) + 5 and mask is None


def test_the_loss_is_flow_matching_on_the_normalised_one_frame_latent(borrowed_qwen_image_pipe, image_dir):
    """predict, recomputed by hand from the same seed: x0 as QwenImageImg2ImgPipeline encodes an image (a sample of
    the latent distribution, (x - latents_mean) / latents_std), t uniform over 1000..1, sigma = t / 1000,
    noisy = (1 - sigma) x0 + sigma noise in 2x2 patches, the transformer called with sigma and masked by r(t),
    target noise - x0 (diffusers' train_dreambooth_lora_qwen_image.py)."""
    pipe = borrowed_qwen_image_pipe
    model, scheduler = pipe.transformer, QwenImage.noise_scheduler(pipe)
    assert torch.allclose(scheduler.timesteps, torch.linspace(1000, 1, 1000))  # dynamic shifting: unshifted here
    conditioning = Conditioning(QwenImage, pipe, [image_dir / "00.png"], PROMPT, 64, torch.device("cpu"),
                                max_sequence_length=16)
    batch = conditioning.batch({"instance": torch.tensor([0])})
    adapters = tlora.attach(model, tlora.TLoRASettings("ortho_lora", 8, 2))
    perturb(adapters)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append((k, adapters.state.mask.clone())),
                                           with_kwargs=True)
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            pred, target = QwenImage.predict(model, pipe, scheduler, batch, torch.float32, 1.0)
    finally:
        hook.remove()
    from tlora.common.images import load_pixels

    pixels, _ = load_pixels(image_dir / "00.png", 64, QwenImage.resize_first)
    g = torch.Generator().manual_seed(3)  # the same stream: latent sample, noise, timestep
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    x0 = img2img._encode_vae_image(pixels[None, :, None], g)[:, :, 0]
    noise = torch.randn(x0.shape, generator=g)
    t = scheduler.timesteps[torch.randint(0, 1000, (1,), generator=g)]  # as the DreamBooth script draws it
    sigma = t / 1000
    noisy = (1 - sigma) * x0 + sigma * noise
    (kwargs, mask), = seen
    packed = noisy.reshape(1, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 16)
    assert torch.allclose(kwargs["hidden_states"], packed, atol=1e-5) and torch.equal(kwargs["timestep"], sigma)
    assert torch.allclose(target, noise - x0, atol=1e-5) and target.shape == (1, 4, 8, 8)
    assert kwargs["encoder_hidden_states_mask"] is None and kwargs["img_shapes"] == [[(1, 4, 4)]]
    assert torch.equal(mask, rank_mask(t, 1000, 8, 2, rule=adapters.settings.rule))
    with torch.no_grad():
        out = model(**kwargs)[0]  # unpacked back to the latent layout
    assert torch.equal(pred, out.reshape(1, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 8, 8))


def test_padded_prompts_stack_and_give_what_each_gives_alone(borrowed_qwen_image_pipe):
    """encode_prompt pads to max_sequence_length (so instance and class prompts stack) with a mask; predict cuts
    them to the longest and keeps the mask only where one is padded: each sample's output is the one of its prompt
    alone, unpadded, as the pipeline calls the transformer."""
    pipe = borrowed_qwen_image_pipe
    model, prompts = pipe.transformer, ("a dog", PROMPT + " in red")
    alone = [pipe.encode_prompt(p)[0] for p in prompts]  # (1, tokens + 5, width), no mask
    cached = [QwenImage.encode_prompt(pipe, p, torch.device("cpu"), 32) for p in prompts]
    assert cached[0]["prompt_embeds"].shape == (1, 32, model.config.joint_attention_dim)
    lengths = [a.shape[1] for a in alone]
    assert [int(c["prompt_embeds_mask"].sum()) for c in cached] == lengths == [7, 12]
    assert torch.equal(cached[1]["prompt_embeds"][:, :12], alone[1]) and not cached[1]["prompt_embeds"][:, 12:].any()
    embeds, mask = prompt_as_called(torch.cat([c["prompt_embeds"] for c in cached]),
                                    torch.cat([c["prompt_embeds_mask"] for c in cached]))
    assert embeds.shape[1] == 12 and mask.tolist() == [[1] * 7 + [0] * 5, [1] * 12]
    inputs = qwen_image_inputs(model, 2, 0)
    with torch.no_grad():
        both = model(**(inputs | {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}),
                     timestep=torch.tensor([0.3, 0.3]), return_dict=False)[0]
        for i, prompt_embeds in enumerate(alone):
            one = model(hidden_states=inputs["hidden_states"][i:i + 1], encoder_hidden_states=prompt_embeds,
                        img_shapes=inputs["img_shapes"][:1], timestep=torch.tensor([0.3]), return_dict=False)[0]
            assert torch.allclose(both[i], one[0], atol=1e-5)
    assert prompt_as_called(cached[1]["prompt_embeds"], cached[1]["prompt_embeds_mask"])[1] is None


def test_instance_and_class_prompts_of_other_lengths_train_together(qwen_image_pipe, image_dir, class_dir):
    """Prior preservation: the instance and class prompts' embeddings (other lengths) stack in one batch."""
    from tlora.train.objective import diffusion_loss

    conditioning = Conditioning(QwenImage, qwen_image_pipe, [image_dir / "00.png"], PROMPT + " in red", 64,
                                torch.device("cpu"), class_images=[class_dir / "0.png"], class_prompt="a dog",
                                max_sequence_length=16)
    batch = conditioning.batch({"instance": torch.tensor([0]), "class": torch.tensor([0])})
    assert batch["prompt_embeds"].shape[:2] == (2, 16) and batch["prompt_embeds_mask"].sum(1).tolist() == [12, 7]
    torch.manual_seed(0)
    with torch.no_grad():
        loss = diffusion_loss(QwenImage, qwen_image_pipe.transformer, qwen_image_pipe,
                              QwenImage.noise_scheduler(qwen_image_pipe), batch, torch.float32, 1.0)
    assert torch.isfinite(loss) and loss > 0


def published_transformer() -> QwenImageTransformer2DModel:
    with init_empty_weights():
        return QwenImageTransformer2DModel.from_config(PUBLISHED["qwen-image"]["transformer"][2])


@pytest.mark.slow
def test_the_published_model_has_seven_adapters_per_block_and_keys_of_its_own():
    """60 blocks x (image q, k, v, out; text q, k, v): 420 adapters of 3072 x 3072. Its keys past SD3.5 Large's 38
    blocks are Qwen-Image's alone; a tiny model's keys fit the MM-DiT families alike (the record says which)."""
    model = published_transformer()
    layers = QwenImage.layers(model)
    assert len(layers) == 420 and {QwenImage.layer_kind(layer.prefix) for layer in layers} == {"image", "text"}
    assert all(model.get_submodule(layer.path).weight.shape == (3072, 3072) for layer in layers)
    keys = [f"{layer.prefix}.down.weight" for layer in layers]
    assert of_keys(keys) == ["qwen_image"] and known_from_keys(keys) == "qwen_image"
    assert "qwen_image" in of_keys(keys[:70]) and known_from_keys(keys[:70]) is None  # blocks 0-9


@pytest.fixture(scope="module", ids=lambda p: "-".join(p),
                params=[("tiny", "ortho_lora"), pytest.param(("wide", "lora"), marks=pytest.mark.slow)])
def qwen_checkpoint(request, tiny_qwen_image, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny Qwen-Image or the wide one (three heads of 8, three blocks),
    on a pipeline of its own, with the metadata our runs write."""
    from tlora.families.pipelines import load_pipeline

    model, trainer_type = request.param
    folder = (tiny_qwen_image if model == "tiny"
              else QwenImage.tiny_model(tmp_path_factory.mktemp("wide-qwen"), seed=1, wide=True))
    pipe = load_pipeline(str(folder), "none", family=QwenImage)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    checkpoint = tmp_path_factory.mktemp(f"qwen_{model}_{trainer_type}") / "checkpoint-10"
    save_weights(adapters.state_dict(), checkpoint, adapters.settings.to_metadata())
    tlora.unload(pipe)
    return pipe, checkpoint


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exports_load_in_the_pipeline_and_equal_the_tlora(qwen_checkpoint, tmp_path, fmt):
    """`--format diffusers` and `--format kohya` files load with QwenImagePipeline.load_lora_weights and give the
    T-LoRA's output with the same fixed mask (`--mask full`: every component, as at t = 0; `timestep:600`)."""
    from tlora.interop.exporting import main

    pipe, checkpoint = qwen_checkpoint
    transformer, inputs = pipe.transformer, qwen_image_inputs(pipe.transformer, 1, 0)
    for mask, t in (("full", 0), ("timestep:600", 600)):
        out = tmp_path / f"{fmt}_{t}.safetensors"
        assert main([str(checkpoint), "--format", fmt, "--out", str(out), "--mask", mask]) == 0
        step = torch.tensor([t / 1000])
        expected, got, base = tlora_and_export_outputs(
            pipe, checkpoint, out, lambda: transformer(timestep=step, return_dict=False, **inputs)[0])
        assert (got - expected).abs().max() <= 1e-5 and (base - expected).abs().max() > 1e-3, (fmt, mask)


def test_the_kohya_file_has_only_keys_comfyui_maps_for_qwen_image(qwen_checkpoint, tmp_path):
    """Every layer of `--format kohya` is one ComfyUI maps for Qwen-Image (comfyui_keys/qwen_image.json, the
    published 60 blocks; the tiny models have fewer): `lora_unet_transformer_blocks_{i}_attn_<projection>`, one per
    adapted projection with its own rows (ComfyUI's model fuses none), the diffusers file's update exactly."""
    from tlora.interop.exporting import main

    pipe, checkpoint = qwen_checkpoint
    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("kohya", "diffusers")}
    for fmt, out in files.items():
        assert main([str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    kohya, meta = read_weights(files["kohya"])
    diffusers, _ = read_weights(files["diffusers"])
    comfy = json.loads((COMFY / "qwen_image.json").read_text())
    layers = {key.rsplit(".", 2)[0] for key in kohya}
    blocks = pipe.transformer.config.num_layers
    assert layers <= set(comfy["keys"]) and len(layers) == blocks * 7 and meta["ss_base_model_version"] == "qwen_image"
    assert f"lora_unet_transformer_blocks_{blocks - 1}_attn_to_out_0" in layers
    for module in (layer.path for layer in QwenImage.layers(pipe.transformer)):
        name = "lora_unet_" + module.replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert up.shape[0] == pipe.transformer.get_submodule(module).out_features
        update = kohya[f"{name}.alpha"] / down.shape[0] * up @ down
        a, b = diffusers[f"transformer.{module}.lora_A.weight"], diffusers[f"transformer.{module}.lora_B.weight"]
        assert torch.allclose(update, b @ a, atol=1e-6)


def test_the_comfyui_fixture_is_what_its_script_derives():
    spec = importlib.util.spec_from_file_location("derive_qwen_image", COMFY / "derive_qwen_image.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    comfy = json.loads((COMFY / "qwen_image.json").read_text())
    keys = sorted(k for w in derive.state_dict_weights(60) for k in derive.lora_keys(w))
    assert comfy["keys"] == keys and len(keys) == 60 * 8 * 5 and comfy["model"] == "Qwen/Qwen-Image"
    assert comfy["source"] == f"{derive.SOURCE}" and derive.SOURCE.endswith("comfy/lora.py model_lora_keys_unet")
    published = {"lora_unet_" + layer.path.replace(".", "_") for layer in QwenImage.layers(published_transformer())}
    assert published <= set(keys)


def test_no_authors_format_for_qwen_image(qwen_checkpoint, tmp_path, capsys):
    from tlora.interop.exporting import main

    _, checkpoint = qwen_checkpoint
    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert main([str(checkpoint), "--format", "authors", "--out", str(out)]) == 2 and not out.exists()
    assert "the authors released no code for it" in capsys.readouterr().err

