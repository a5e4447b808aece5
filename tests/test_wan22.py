"""Wan 2.2 A14B: both experts adapted in one T-LoRA whose mask follows the same paper t in both (each expert's call
carries the scheduler's t), training sends each sample to the expert WanPipeline uses at its t, the exports are a
file per expert that diffusers and ComfyUI load, and a 2.2 T-LoRA is refused on Wan 2.1 and the other way round.
Wan 2.1 itself is test_wan's."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import tlora
from tlora.common.errors import CheckpointError, UsageError
from tlora.families.pipelines import DTYPES, load_pipeline
from tlora.families.wan import EXPERTS, Wan, WanExperts, tiny_wan22
from tlora.formats import kohya
from tlora.runs.weights import save_weights

from conftest import assert_helpful
from helpers import perturb, read_weights, train_args, wan_inputs, with_flags

COMFY = Path(__file__).parent / "comfyui_keys"
CALL = {"height": 32, "width": 32, "num_frames": 1, "max_sequence_length": 16, "num_inference_steps": 4,
        "output_type": "latent"}  # UniPC's 4 steps: t 999, 900 (transformer), 750, 500 (transformer_2)


@pytest.fixture(scope="module")
def tiny_wan22_folder(tmp_path_factory) -> Path:
    return tiny_wan22(tmp_path_factory.mktemp("wan22"))


@pytest.fixture
def pipe22(tiny_wan22_folder):
    """A fresh tiny Wan 2.2 pipeline (loading it takes a tenth of a second): each test's adapters and LoRAs its own."""
    return load_pipeline(str(tiny_wan22_folder), "none")


@pytest.fixture(scope="module")
def checkpoint22(tiny_wan22_folder, tmp_path_factory) -> Path:
    """A perturbed (as if trained) ortho_lora T-LoRA of both experts, with the metadata our runs write."""
    pipe = load_pipeline(str(tiny_wan22_folder), "none")
    torch.manual_seed(0)
    adapters = tlora.attach(pipe, tlora.TLoRASettings("ortho_lora", 4, 2))
    perturb(adapters, seed=7)
    checkpoint = tmp_path_factory.mktemp("wan22_ortho") / "checkpoint-10"
    save_weights(adapters.state_dict(), checkpoint, adapters.settings.to_metadata())
    return checkpoint


def latents(pipe, **kwargs) -> torch.Tensor:
    return pipe("a photo of sks dog", generator=torch.Generator().manual_seed(0), **CALL, **kwargs).frames


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((got - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_both_experts_are_adapted_and_each_masks_by_the_schedulers_t(pipe22):
    """WanPipeline 2.2 calls `transformer` at t >= 0.875 x 1000 and `transformer_2` below, each with the scheduler's t
    (twice a step: guidance): the mask in the expert called is r(t) of that t. One root (WanExperts, the experts as
    its children) for attach, set_scale and unload."""
    root = Wan.model(pipe22)
    assert isinstance(root, WanExperts) and Wan.model(pipe22) is root and root.transformer is pipe22.transformer
    adapters = tlora.attach(pipe22, tlora.TLoRASettings("lora", 8, 2))
    per_expert = len(Wan.layers(pipe22.transformer))
    assert len(adapters.adapters) == 2 * per_expert == 2 * 2 * 2 * 4  # 2 experts x 2 blocks x attn1, attn2 x q k v o
    assert {key.split(".")[0] for key in adapters.adapters} == set(EXPERTS)
    seen = []
    hooks = [getattr(pipe22, name).register_forward_pre_hook(
        lambda m, a, k, name=name: seen.append((name, k["timestep"].clone(), adapters.states[name].mask.clone())),
        with_kwargs=True) for name in EXPERTS]
    try:
        latents(pipe22, num_videos_per_prompt=2)
    finally:
        for hook in hooks:
            hook.remove()
    timesteps = pipe22.scheduler.timesteps.repeat_interleave(2)
    assert [name for name, _, _ in seen] == ["transformer"] * 4 + ["transformer_2"] * 4
    for (name, timestep, mask), t in zip(seen, timesteps):
        assert torch.equal(timestep, t.expand(2)) and (t >= 875) == (name == "transformer")
        assert torch.equal(mask, adapters.settings.mask(timestep.float()))
    assert seen[0][2].sum() < seen[-1][2].sum()
    tlora.set_scale(pipe22, 0.5)
    assert all(state.scale == 0.5 for state in adapters.states.values())
    tlora.unload(pipe22)
    assert not any(getattr(pipe22, name)._forward_pre_hooks for name in EXPERTS)
    assert not any(isinstance(v, torch.nn.Module) for k, v in vars(pipe22).items() if k.startswith("_tlora"))


def test_training_sends_each_sample_to_its_experts_and_checkpointing_keeps_each_mask(pipe22):
    """Called as a transformer (train.py), WanExperts runs each sample on the expert WanPipeline uses at its t, the
    rows put back in order; with gradient checkpointing each expert's recomputation in backward uses its own call's
    mask (same gradients as without)."""
    root = Wan.model(pipe22)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe22, tlora.TLoRASettings("lora", 8, 2))
    perturb(adapters, seed=1)
    inputs, t = wan_inputs(root, 3, 0), torch.tensor([950.0, 100.0, 875.0])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            root.enable_gradient_checkpointing()
        out = root(timestep=t, return_dict=False, **inputs)[0]
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in adapters.trainable_parameters()])
        for p in adapters.trainable_parameters():
            p.grad = None
    root.disable_gradient_checkpointing()
    with torch.no_grad():
        for row, expert in ((0, pipe22.transformer), (1, pipe22.transformer_2), (2, pipe22.transformer)):
            alone = expert(timestep=t[row:row + 1], return_dict=False,
                           **{k: v[row:row + 1] for k, v in inputs.items()})[0]
            assert torch.allclose(out[row:row + 1], alone, atol=1e-5), row
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert all(g.abs().sum() > 0 for g in grads[0])  # both experts learn from this batch


def test_without_boundary_ratio_every_sample_goes_to_transformer_as_in_wanpipeline(pipe22):
    """WanPipeline with transformer_2 but no boundary_ratio runs `transformer` at every step (pipeline_wan.py:
    `boundary_timestep is None or t >= boundary_timestep`): training sends every sample there too."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**pipe22.components, boundary_ratio=None)
    pipe.set_progress_bar_config(disable=True)
    called = []
    hooks = [getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: called.append(name))
             for name in EXPERTS]
    try:
        latents(pipe)
        in_pipeline, called[:] = list(called), []
        root = Wan.model(pipe)
        with torch.no_grad():
            root(timestep=torch.tensor([999.0, 500.0, 1.0]), return_dict=False, **wan_inputs(root, 3, 0))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(in_pipeline) == {"transformer"} and called == ["transformer"]


def test_the_exports_are_a_file_per_expert_that_diffusers_and_comfyui_load_as_the_tlora(pipe22, checkpoint22,
                                                                                        tmp_path):
    """`--format diffusers`: _high_noise and _low_noise files that WanPipeline.load_lora_weights loads (the second
    with load_into_transformer_2=True); `--format kohya`: the same as ComfyUI's WAN21 keys, merged into each expert
    as ComfyUI merges a LoRA into its model; both give the latents of tlora.load with the full mask."""
    from tlora.interop.exporting import main

    for fmt in ("diffusers", "kohya"):
        assert main([str(checkpoint22), "--format", fmt, "--out", str(tmp_path / f"{fmt}.safetensors")]) == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {f"{fmt}_{noise}_noise.safetensors" for fmt in ("diffusers", "kohya") for noise in ("high", "low")}
    base = latents(pipe22)
    tlora.load(pipe22, checkpoint22, trainer_class="wan_lora")  # every component at every t: the --mask full LoRA
    expected = latents(pipe22)
    tlora.unload(pipe22)
    assert not close(base, expected)

    pipe22.load_lora_weights(str(tmp_path / "diffusers_high_noise.safetensors"), adapter_name="tlora")
    pipe22.load_lora_weights(str(tmp_path / "diffusers_low_noise.safetensors"), adapter_name="tlora",
                             load_into_transformer_2=True)
    assert close(latents(pipe22), expected)
    pipe22.delete_adapters("tlora")

    comfy = set(json.loads((COMFY / "wan.json").read_text())["keys"])
    for name, noise in zip(EXPERTS, ("high", "low")):
        weights, meta = read_weights(tmp_path / f"kohya_{noise}_noise.safetensors")
        layers = {key.split(".")[0] for key in weights}
        assert layers <= comfy and len(layers) == 2 * 2 * 4 and meta["ss_base_model_version"] == "wan"
        expert = getattr(pipe22, name)
        linears = {kohya.key(Wan.original_names([path])[path]): expert.get_submodule(path) for path in
                   (layer.path for layer in Wan.layers(expert))}
        with torch.no_grad():  # ComfyUI's calculate_weight: W += strength * alpha / rank * up @ down
            for key in layers:
                base_layer = getattr(linears[key], "base_layer", linears[key])
                down = weights[f"{key}.lora_down.weight"]
                base_layer.weight += weights[f"{key}.alpha"] / down.shape[0] * weights[f"{key}.lora_up.weight"] @ down
    assert close(latents(pipe22), expected)


def test_the_scheduled_export_switches_both_experts_as_the_tlora(pipe22, checkpoint22, tmp_path):
    """`--format diffusers-scheduled`: each chunk a file per expert, switched together per step by tlora.scheduled:
    the latents of the T-LoRA itself."""
    from tlora.interop.exporting import main

    out = tmp_path / "scheduled"
    assert main([str(checkpoint22), "--format", "diffusers-scheduled", "--out", str(out)]) == 0
    chunks = json.loads((out / "schedule.json").read_text())["chunks"]
    assert all(c["file"].endswith("_high_noise.safetensors") and c["file_2"].endswith("_low_noise.safetensors")
               for c in chunks)
    tlora.load(pipe22, checkpoint22)
    expected = latents(pipe22)
    tlora.unload(pipe22)
    step = tlora.scheduled(pipe22, out, num_inference_steps=CALL["num_inference_steps"])
    assert set(pipe22.get_list_adapters()["transformer_2"]) == {c["adapter"] for c in chunks}
    assert close(latents(pipe22, callback_on_step_end=step), expected)


def test_a_wan22_tlora_is_refused_on_wan21_and_a_wan21_one_on_wan22(pipe22, checkpoint22, wan_pipe, tmp_path):
    from tlora.interop.exporting import main

    with pytest.raises(CheckpointError, match="Wan 2.2 A14B T-LoRA .*transformer_2.*one Wan transformer") as err:
        tlora.load(wan_pipe, checkpoint22)
    assert_helpful(str(err.value))
    adapters = tlora.attach(wan_pipe, tlora.TLoRASettings("lora", 4, 2))
    perturb(adapters)
    save_weights(adapters.state_dict(), tmp_path / "wan21", adapters.settings.to_metadata())
    tlora.unload(wan_pipe)
    with pytest.raises(CheckpointError, match="Wan 2.1 T-LoRA .*Wan 2.2 A14B pipeline") as err:
        tlora.load(pipe22, tmp_path / "wan21")
    assert_helpful(str(err.value))
    assert main([str(tmp_path / "wan21"), "--format", "diffusers-scheduled", "--out", str(tmp_path / "s21")]) == 0
    with pytest.raises(UsageError, match="adapts one transformer; this pipeline has two") as err:
        tlora.scheduled(pipe22, tmp_path / "s21", num_inference_steps=4)
    assert_helpful(str(err.value))


@pytest.mark.slow
def test_the_estimate_counts_both_experts(tiny_wan22_folder):
    """Both experts' weights, adapters and optimizer state are on the device; a step runs one expert (on `meta` the
    whole batch goes to `transformer`)."""
    from tlora.train.estimator import parse_args, trace_step

    opts, _ = parse_args(["--pretrained_model_name_or_path", str(tiny_wan22_folder), "--resolution", "64",
                          "--lora_rank", "4", "--min_rank", "2", "--max_sequence_length", "16"])
    traced = trace_step(opts, str(tiny_wan22_folder))
    assert traced["adapters"] == 2 * 2 * 2 * 4  # both experts' (2 blocks x attn1, attn2 x q, k, v, out)
    pipe = load_pipeline(str(tiny_wan22_folder), "none")
    expert_bytes = sum(p.numel() for p in pipe.transformer.parameters()) * DTYPES[opts.mixed_precision].itemsize
    assert traced["split"]["weights"] >= 2 * expert_bytes


def test_a_quantized_base_quantizes_both_experts(tiny_wan22_folder, tiny_wan, monkeypatch):
    """--base_model_precision's mapping (pipelines.quantization: the denoiser attribute only) gets transformer_2 too
    for a Wan 2.2 folder, not for Wan 2.1 (whose pipeline has none: diffusers would warn)."""
    from types import SimpleNamespace

    from tlora.families.base import Family

    given = []
    monkeypatch.setattr(Family, "load_pipeline", classmethod(lambda cls, *args: given.append(args[-1])))
    for folder in (tiny_wan22_folder, tiny_wan):
        Wan.load_pipeline(str(folder), None, None, torch.bfloat16, SimpleNamespace(quant_mapping={"transformer": 4}))
    assert [q.quant_mapping for q in given] == [{"transformer": 4, "transformer_2": 4}, {"transformer": 4}]


@pytest.mark.slow
@pytest.mark.parametrize("trainer_type, flags", [  # (what the tiny model's draws give: both experts one by one,
    ("ortho_lora", ()),                            # both in one batch, the low-noise one only)
    ("lora", ("--train_batch_size", "2", "--gradient_checkpointing", "--seed", "5")),
    ("lora", ("--train_batch_size", "2"))], ids=["ortho_lora", "lora-mixed-batch", "lora-low-only"])
def test_train_py_trains_the_expert_of_each_drawn_t_and_inference_samples(tiny_wan22_folder, image_dir, tmp_path,
                                                                          monkeypatch, trainer_type, flags):
    """Two steps: an expert's adapters move exactly when a drawn t is in its range (t >= 875: transformer), one
    checkpoint holds both; inference.py samples with both adapted."""
    from tlora.families import wan

    import inference
    import train

    drawn, start = [], {}
    forward, attach = wan.WanExperts.forward, wan.Wan.attach.__func__

    def recorded(self, hidden_states, timestep, *args, **kwargs):
        drawn.extend(timestep.tolist())
        return forward(self, hidden_states, timestep, *args, **kwargs)

    def kept(cls, *args, **kwargs):
        adapters = attach(cls, *args, **kwargs)
        start.update({k: v.clone() for k, v in adapters.state_dict().items()})
        return adapters

    monkeypatch.setattr(wan.WanExperts, "forward", recorded)
    monkeypatch.setattr(wan.Wan, "attach", classmethod(kept))
    out = tmp_path / "out"
    assert train.main(with_flags(train_args(tiny_wan22_folder, image_dir, out), (
        "--trainer_type", trainer_type, "--trainer_class", "wan_tlora", "--num_train_epochs", "2",
        "--max_sequence_length", "16", "--mixed_precision", "no", *flags))) == 0
    (folder,) = out.iterdir()
    weights, meta = read_weights(folder / "checkpoint-2")
    assert meta["family"] == "wan" and len(drawn) == 2 * (2 if flags else 1)
    for name, drawn_here in (("transformer", any(t >= 875 for t in drawn)),
                             ("transformer_2", any(t < 875 for t in drawn))):
        keys = [k for k in weights if k.startswith(f"{name}.")]
        assert len(keys) == len(weights) // 2
        assert any(not torch.equal(weights[k], start[k]) for k in keys) == drawn_here, (name, drawn)
    hp = yaml.safe_load((folder / "logs" / "hparams.yml").read_text())
    assert hp["family"] == "wan"
    monkeypatch.undo()
    assert inference.main(["--config_path", str(folder / "logs/hparams.yml"), "--checkpoint_idx", "2", "--prompts",
                           "a {0} riding a bike", "--num_images_per_prompt", "1", "--num_inference_steps", "4",
                           "--height", "32", "--width", "32", "--num_frames", "5"]) == 0
    samples = folder / "checkpoint-2/samples/ns4_gs5.0/version_0/a sks riding a bike"
    assert {"0.png", "grid.png"} <= {p.name for p in samples.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_wan22(tiny_wan22_folder, image_dir, tmp_path):
    """DDP over WanExperts: a step runs one expert per sample, so the other's adapters may have no gradient in a
    process (find_unused_parameters, which the trainer sets for a denoiser of several entries)."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "train.py"), *with_flags(train_args(tiny_wan22_folder, image_dir, tmp_path), (
                               "--trainer_class", "wan_tlora", "--num_train_epochs", "4", "--max_sequence_length",
                               "16", "--mixed_precision", "no"))],
                          capture_output=True, text=True, timeout=600, env=env | {"OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    assert (run / "checkpoint-4" / "pytorch_lora_weights.safetensors").is_file()
