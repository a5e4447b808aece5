"""Stable Diffusion 3.5: what is its own (the timestep the pipeline passes, the flow-matching target, the adapted
layers of its joint blocks, ComfyUI's keys for its exports, the command lines); what it shares with the other
families is in test_families."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import SD3Transformer2DModel

import tlora
from tlora.families import known_from_keys
from tlora.families.sd3 import PUBLISHED, SD3
from tlora.method.adapters import rank_mask
from tlora.runs.weights import save_weights

from helpers import perturb, read_weights, sd3_inputs, tlora_and_export_outputs

COMFY = json.loads((Path(__file__).parent / "comfyui_keys" / "sd3.json").read_text())


def test_the_pipeline_passes_the_scheduler_timestep_and_masks_by_it(borrowed_sd3_pipe):
    """StableDiffusion3Pipeline calls the transformer with the scheduler's timestep itself (sigma x 1000, the
    batch doubled for guidance): diffusion_t and scheduler_t give it back unchanged, and each call's mask is r(t)."""
    pipe = borrowed_sd3_pipe
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings("lora", 8, 2))
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["timestep"].clone(), adapters.state.mask.clone())), with_kwargs=True)
    try:
        pipe(prompt="a photo of sks dog", num_inference_steps=5, height=64, width=64, max_sequence_length=16,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    steps = pipe.scheduler.timesteps
    assert len(seen) == len(steps) == 5 and steps[0] == 1000  # sigma 1: pure noise is the paper's t = T
    for (timestep, mask), t in zip(seen, steps):
        assert timestep.shape == (2,) and torch.equal(timestep, t.expand(2))  # classifier-free guidance: 2 rows
        assert torch.equal(SD3.diffusion_t(timestep), timestep) and SD3.scheduler_t(t) == t
        assert torch.equal(mask, rank_mask(t[None], 1000, 8, 2, rule=adapters.settings.rule).expand(2, -1))
    assert seen[0][1].sum(1)[0] == 2 and seen[-1][1].sum(1)[0] == 7  # min_rank at t = T; int(0.991 x 6) + 2 at 8.9


def batch_of(pipe, rows: int = 2, seed: int = 0) -> dict:
    """A cached batch as train.py makes it (latent distribution, prompt embeddings, pooled), random."""
    g, c = torch.Generator().manual_seed(seed), pipe.transformer.config
    shapes = SD3.conditioning_shapes(pipe.transformer, 64, 16)
    batch = {k: torch.randn((rows, *shape[1:]), generator=g) for k, shape in shapes.items()}
    batch["std"] = batch["std"].abs() * 0.1
    assert batch["mean"].shape == (rows, c.in_channels, 8, 8)
    return batch


def test_the_training_target_is_flow_matching_as_diffusers_sd3_script(borrowed_sd3_pipe):
    """predict: x0 = (sample - shift_factor) x scaling_factor, t from the shifted training timesteps, the noisy input
    as diffusers' FlowMatchEulerDiscreteScheduler.scale_noise makes it, the transformer called with t itself (and
    masked by r(t)), target noise - x0 (train_dreambooth_lora_sd3.py without preconditioning)."""
    pipe = borrowed_sd3_pipe
    model, batch, scheduler = pipe.transformer, batch_of(pipe), SD3.noise_scheduler(pipe)
    s = torch.linspace(1, 0.001, 1000)
    assert torch.allclose(scheduler.timesteps, 1000 * 3 * s / (1 + 2 * s))  # shift 3, as the script draws from
    adapters = tlora.attach(model, tlora.TLoRASettings("ortho_lora", 8, 2))
    perturb(adapters)
    masks = []
    hook = model.register_forward_pre_hook(lambda m, a, k: masks.append(adapters.state.mask.clone()), with_kwargs=True)
    try:
        torch.manual_seed(3)
        pred, target = SD3.predict(model, pipe, scheduler, batch, torch.float32, 1.0)
    finally:
        hook.remove()
    torch.manual_seed(3)  # by hand, in the same order: the latent sample, the noise, the timesteps
    sample = batch["mean"] + batch["std"] * torch.randn_like(batch["mean"])
    x0 = (sample - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn_like(x0)
    t = scheduler.timesteps[torch.randint(0, 1000, (2,))]
    noisy = scheduler.scale_noise(x0, t, noise)
    with torch.no_grad():
        expected = model(noisy, encoder_hidden_states=batch["prompt_embeds"], pooled_projections=batch["pooled"],
                         timestep=t, return_dict=False)[0]
    assert torch.equal(target, noise - x0) and torch.equal(pred.detach(), expected)
    assert torch.equal(masks[0], rank_mask(t, 1000, 8, 2, rule=adapters.settings.rule))


def published_layers(name: str) -> list:
    config = dict(PUBLISHED[name]["transformer"][2], pos_embed_max_size=8)  # a small position table: built on the
    with init_empty_weights():  # CPU (Medium's 384 x 384 x 1536 takes seconds) and no concern of the layers
        model = SD3Transformer2DModel.from_config(config)
    return SD3.layers(model)


@pytest.mark.parametrize("name, count, blocks", [("sd3.5-medium", 242, 24), ("sd3.5-large", 302, 38)])
def test_adapters_of_the_published_models(name, count, blocks):
    """Both streams of every joint block (8 projections), attn2's 4 in Medium's first 13 blocks; the last block's
    text stream is pre-only: no to_add_out, and no adapter on its q (its text queries' outputs are discarded)."""
    prefixes = [layer.prefix for layer in published_layers(name)]
    last = f"transformer_blocks.{blocks - 1}.attn.processor."
    assert len(prefixes) == count == blocks * 8 - 2 + (13 * 4 if name.endswith("medium") else 0)
    assert last + "to_k_proj_lora" in prefixes and not {last + "to_q_proj_lora", last + "to_add_out_lora"} & set(
        prefixes)
    assert {SD3.layer_kind(p) for p in prefixes} == (set(SD3.layer_kinds) - ({"self"} if "large" in name else set()))
    config = PUBLISHED[name]["transformer"][2]  # ComfyUI's q, k, v slices are 64 x depth rows: the inner width
    assert config["num_attention_heads"] * config["attention_head_dim"] == 64 * config["num_layers"]


def test_the_last_text_query_changes_nothing(borrowed_sd3_pipe):
    """Why the last block's add_q_proj has no adapter: changing it leaves the output as it was."""
    model = borrowed_sd3_pipe.transformer
    inputs, t = sd3_inputs(model, 2, 0), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        before = model(timestep=t, return_dict=False, **inputs)[0]
        last = model.transformer_blocks[-1].attn.add_q_proj
        saved = last.weight.clone()
        last.weight.add_(1.0)
        after = model(timestep=t, return_dict=False, **inputs)[0]
        last.weight.copy_(saved)
    assert torch.equal(before, after)


def test_keys_say_sd3(borrowed_sd3_pipe, tmp_path):
    adapters = tlora.attach(borrowed_sd3_pipe.transformer, tlora.TLoRASettings("lora", 4, 1))
    keys = list(adapters.state_dict())
    assert known_from_keys(keys) == "sd3"
    save_weights(adapters.state_dict(), tmp_path / "alone", {"trainer_type": "lora", "lora_rank": 4})
    with pytest.warns(tlora.AssumedSetting, match="nothing records"):
        assert tlora.read(tmp_path / "alone").settings.family == "sd3"


@pytest.fixture(scope="module", ids=lambda p: "-".join(p),
                params=[("tiny", "ortho_lora"), pytest.param(("wide", "lora"), marks=pytest.mark.slow)])
def sd3_checkpoint(request, tiny_sd3, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA of the tiny SD3 (Medium's layout) or the wide one (Large's: no attn2,
    other widths), on a pipeline of its own, with the metadata our runs write."""
    from tlora.families.pipelines import load_pipeline

    model, trainer_type = request.param
    folder = tiny_sd3 if model == "tiny" else SD3.tiny_model(tmp_path_factory.mktemp("wide-sd3"), seed=1, wide=True)
    pipe = load_pipeline(str(folder), "none")
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.transformer, tlora.TLoRASettings(trainer_type, 4, 2))
    perturb(adapters, seed=7)
    checkpoint = tmp_path_factory.mktemp(f"sd3_{model}_{trainer_type}") / "checkpoint-10"
    save_weights(adapters.state_dict(), checkpoint, adapters.settings.to_metadata())
    tlora.unload(pipe)
    return pipe, checkpoint


@pytest.mark.parametrize("mask, t", [("full", 0), ("timestep:600", 600)])
def test_the_diffusers_export_loads_in_the_pipeline_and_equals_the_tlora(sd3_checkpoint, tmp_path, mask, t):
    from tlora.interop.exporting import main

    pipe, checkpoint = sd3_checkpoint
    out = tmp_path / "sd3_lora.safetensors"
    assert main([str(checkpoint), "--format", "diffusers", "--out", str(out), "--mask", mask]) == 0
    transformer, inputs, step = pipe.transformer, sd3_inputs(pipe.transformer, 1, 0), torch.tensor([float(t)])
    expected, got, base = tlora_and_export_outputs(
        pipe, checkpoint, out, lambda: transformer(timestep=step, return_dict=False, **inputs)[0])
    assert (got - expected).abs().max() <= 1e-5 and (base - expected).abs().max() > 1e-3
    weights, _ = read_weights(out)  # every layer a name ComfyUI maps, q, k, v with the rows of its slices
    names = {k.rsplit(".lora_", 1)[0] for k in weights}
    assert names <= set(COMFY["keys"])
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert all(weights[f"{n}.lora_B.weight"].shape[0] == inner for n in names)
    assert {length for _, _, length in COMFY["slices"].values()} == {64 * 24}  # Medium's inner width, as here


def test_the_kohya_export_has_comfyuis_names_and_fuses_q_k_v_exactly(sd3_checkpoint, tmp_path):
    """Every key is one ComfyUI maps for SD3 (lora_unet_joint_blocks_..., its own MMDiT layout), the qkv layers have
    ComfyUI's 3 x inner rows, and ComfyUI's update (alpha / rank x up @ down on each fused weight) is, row block by
    row block, the diffusers file's update of each projection."""
    from tlora.interop.exporting import main

    pipe, checkpoint = sd3_checkpoint
    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("kohya", "diffusers")}
    for fmt, out in files.items():
        assert main([str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    kohya, meta = read_weights(files["kohya"])
    diffusers, _ = read_weights(files["diffusers"])
    layers = {k.rsplit(".", 2)[0] for k in kohya}
    assert layers <= set(COMFY["keys"]) and meta["ss_base_model_version"] == "sd3"
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    fused = {"x_block_attn_qkv": ("attn", ("to_q", "to_k", "to_v")), "x_block_attn_proj": ("attn", ("to_out.0",)),
             "context_block_attn_qkv": ("attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
             "context_block_attn_proj": ("attn", ("to_add_out",)),
             "x_block_attn2_qkv": ("attn2", ("to_q", "to_k", "to_v")), "x_block_attn2_proj": ("attn2", ("to_out.0",))}
    for layer in layers:
        block, name = layer.removeprefix("lora_unet_joint_blocks_").split("_", 1)
        attention, projections = fused[name]
        down, up = kohya[f"{layer}.lora_down.weight"], kohya[f"{layer}.lora_up.weight"]
        assert up.shape[0] == inner * len(projections)  # mmdit.py: qkv = Linear(dim, 3 dim), proj = Linear(dim, dim)
        delta = kohya[f"{layer}.alpha"] / down.shape[0] * up @ down
        for i, proj in enumerate(projections):
            key = f"transformer.transformer_blocks.{block}.{attention}.{proj}"
            rows = delta[i * inner:(i + 1) * inner]
            if f"{key}.lora_A.weight" in diffusers:
                assert torch.allclose(rows, diffusers[f"{key}.lora_B.weight"] @ diffusers[f"{key}.lora_A.weight"],
                                      atol=1e-6)
            else:  # the last block's text q: no adapter, zero rows
                assert proj == "add_q_proj" and not rows.any()
    assert any(k.endswith("_context_block_attn_qkv") for k in layers)
    assert not any(k.endswith(f"_{pipe.transformer.config.num_layers - 1}_context_block_attn_proj") for k in layers)


def test_no_authors_format_for_sd3(sd3_checkpoint, tmp_path, capsys):
    from tlora.interop.exporting import main

    _, checkpoint = sd3_checkpoint
    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert main([str(checkpoint), "--format", "authors", "--out", str(out)]) == 2 and not out.exists()
    assert "the authors released no code for it" in capsys.readouterr().err


@pytest.mark.slow
def test_the_estimators_meta_trace_is_the_real_step(tiny_sd3):
    """The estimator's step on the tiny SD3 built empty (its buffers on meta too: the position table) tracks the
    same bytes as the step run for real on the CPU."""
    from tlora.families.pipelines import load_pipeline
    from tlora.train.estimator import parse_args, trace_step

    opts, _ = parse_args(["--pretrained_model_name_or_path", str(tiny_sd3), "--resolution", "64", "--lora_rank", "4",
                          "--min_rank", "2", "--max_sequence_length", "16", "--mixed_precision", "no"])
    traced = trace_step(opts, str(tiny_sd3))
    real = trace_step(opts, pipe=load_pipeline(str(tiny_sd3), "none"))
    for kind in ("weights", "adapters", "optimizer"):
        assert traced["split"][kind] == real["split"][kind] > 0
    assert abs(sum(traced["split"].values()) / sum(real["split"].values()) - 1) < 0.05
