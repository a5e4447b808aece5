"""Exported T-LoRAs load in stock diffusers and give what the T-LoRA gives (fixed mask, or the exact schedule)."""

import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tlora
from tlora.families.sdxl import sgm_path
from tlora.interop.exporting import best_rank, main
from tlora.runs.weights import WEIGHTS_NAME, save_weights

from helpers import perturb, read_weights, sdxl_inputs


@pytest.fixture(scope="module", params=["lora", "ortho_lora"])
def checkpoint(request, tiny_sdxl, tmp_path_factory):
    """A perturbed (as if trained) T-LoRA checkpoint of each type, rank 4, min_rank 2."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    torch.manual_seed(0)
    adapters = tlora.attach(unet, tlora.TLoRASettings(request.param, 4, 2))
    perturb(adapters, seed=7)
    folder = tmp_path_factory.mktemp(f"ckpt_{request.param}") / "checkpoint-10"
    save_weights(adapters.state_dict(), folder, {"trainer_type": request.param, "trainer_class": "sdxl_tlora",
                                                 "lora_rank": 4, "min_rank": 2, "alpha_rank_scale": 1.0})
    return folder


@pytest.fixture
def pipe(borrowed_sdxl_pipe):
    """The session's tiny SDXL pipeline: the tests load T-LoRAs and diffusers LoRAs on it, taken off after each."""
    return borrowed_sdxl_pipe


def unet_out(pipe, t):
    with torch.no_grad():
        return pipe.unet(timestep=t, **sdxl_inputs(pipe.unet)).sample


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("t", [0, 700])
def test_fixed_mask_export_equals_the_tlora_at_that_timestep(pipe, checkpoint, tmp_path, caplog, fmt, t):
    out = tmp_path / f"{fmt}.safetensors"
    mask = "full" if t == 0 else f"timestep:{t}"
    assert main([str(checkpoint), "--format", fmt, "--out", str(out), "--mask", mask]) == 0
    tlora.load(pipe, checkpoint)
    expected = unet_out(pipe, t)  # the T-LoRA's own mask at t (t = 0: every component)
    tlora.unload(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    words = ("unexpected key", "not been correctly", "unused", "not used", "were not")  # peft's and diffusers' words
    unused = [r.message for r in caplog.records if any(w in r.message.lower() for w in words)]
    assert not unused, unused
    got = unet_out(pipe, t)
    assert (got - expected).abs().max() <= 1e-5
    assert not torch.allclose(got, unet_out_base(pipe, t), atol=1e-4)  # the LoRA does something
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in keys)
        assert any("_input_blocks_" in k for k in keys) and any("_middle_block_1_" in k for k in keys)
    else:
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
        assert "lora_adapter_metadata" in meta


def unet_out_base(pipe, t):
    pipe.disable_lora()
    try:
        return unet_out(pipe, t)
    finally:
        pipe.enable_lora()


def test_components_are_exact_and_zero_ones_dropped(checkpoint, tmp_path):
    weights, _ = read_weights(checkpoint)
    trainer_type = "ortho_lora" if any(k.endswith("q_layer.weight") for k in weights) else "lora"
    out = tmp_path / "d.safetensors"
    assert main([str(checkpoint), "--format", "diffusers", "--out", str(out), "--mask", "timestep:999"]) == 0
    with safe_open(str(out), "pt") as f:
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if ".lora_A." in k}
    assert ranks == {2 if trainer_type == "lora" else 4}  # min_rank components (x2 for the frozen path)
    zero = dict(weights)
    for key in [k for k in zero if k.endswith("up.weight")]:
        zero[key] = torch.zeros_like(zero[key])  # an untrained Vanilla T-LoRA: nothing to export
    if trainer_type == "lora":
        save_weights(zero, tmp_path / "zero", {"trainer_type": "lora", "lora_rank": 4})
        assert main([str(tmp_path / "zero"), "--format", "kohya", "--out", str(tmp_path / "z.safetensors")]) == 2


def test_best_rank_approximation():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(6, 20, generator=g), torch.randn(12, 6, generator=g)
    d, u, err = best_rank(down, up, 3)
    s = torch.linalg.svdvals((up @ down).double())
    assert d.shape == (3, 20) and u.shape == (12, 3)
    assert abs(err - float((s[3:].square().sum() / s.square().sum()).sqrt())) < 1e-6
    assert torch.allclose((u @ d).double(), (up @ down).double(), atol=10) and best_rank(down, up, 6)[2] == 0.0


def test_authors_format_and_sgm_paths(checkpoint, tmp_path):
    out = tmp_path / WEIGHTS_NAME
    assert main([str(checkpoint), "--format", "authors", "--out", str(out)]) == 0
    ours, theirs = read_weights(checkpoint), read_weights(out)
    assert theirs[1] == {"format": "pt"} and ours[0].keys() == theirs[0].keys()
    assert all(torch.equal(ours[0][k], theirs[0][k]) for k in ours[0])
    assert sgm_path("down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_out.0", 2) == \
        "input_blocks.8.1.transformer_blocks.3.attn2.to_out.0"
    assert sgm_path("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k", 2) == \
        "output_blocks.5.1.transformer_blocks.0.attn1.to_k"
    assert sgm_path("mid_block.attentions.0.transformer_blocks.9.attn1.to_q", 2) == \
        "middle_block.1.transformer_blocks.9.attn1.to_q"


def images(pipe, callback=None, steps=6):
    kwargs = {"callback_on_step_end": callback} if callback else {}
    return pipe("a sks dog", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


@pytest.mark.slow
def test_scheduled_export_is_the_exact_tlora_in_stock_diffusers(pipe, checkpoint, tmp_path):
    folder = tmp_path / "scheduled"
    assert main([str(checkpoint), "--format", "diffusers-scheduled", "--out", str(folder)]) == 0
    tlora.load(pipe, checkpoint)
    expected, expected_4 = images(pipe), images(pipe, steps=4)
    tlora.unload(pipe)
    base = images(pipe)
    step = tlora.scheduled(pipe, folder, num_inference_steps=6)
    assert len(pipe.get_list_adapters()["unet"]) == 3  # min_rank 2, then components 3 and 4: chunks [0,2) [2,3) [3,4)
    got = images(pipe, step)
    assert np.abs(got * 255 - expected * 255).max() <= 1.0
    assert np.abs(got * 255 - base * 255).max() > 1.0  # and the T-LoRA changes the images
    assert np.abs(images(pipe, step) * 255 - expected * 255).max() <= 1.0  # the callback re-arms for the next call
    # another step count whose first step needs the same chunks: the following steps follow the scheduler
    assert np.abs(images(pipe, step, steps=4) * 255 - expected_4 * 255).max() <= 1.0
    with pytest.raises(ValueError, match="pass the same num_inference_steps"):
        images(pipe, step, steps=1)  # t = 1 at the first step: every component, not the 2 set up for t = 831


@pytest.mark.parametrize("settings", [
    tlora.TLoRASettings("ortho_lora", 4, 2, 0.5, True, "sdxl", sig_type="middle", rank_rule="divide_first"),
    tlora.TLoRASettings("lora", 16, 4, 1.0, False, "flux", rank_rule="multiply_first"),
    tlora.TLoRASettings("lora", 8, 1, 2.0, True, "klein", num_train_timesteps=500, rank_rule="multiply_first"),
])
def test_a_schedule_round_trips_through_the_settings(tmp_path, settings):
    """schedule.json holds the settings as TLoRASettings writes them; tlora.scheduled reads them back the same."""
    import json

    from tlora.formats.diffusers_scheduled import SCHEDULE_NAME
    from tlora.formats.diffusers_scheduled import chunks as schedule_chunks
    from tlora.formats.diffusers_scheduled import schedule as schedule_of
    from tlora.generate.scheduled import read_schedule

    chunks = [{"adapter": f"c{i}", "file": f"c{i}.safetensors", "components": [a, b], "on_below": on}
              for i, (a, b, on) in enumerate(schedule_chunks(settings))]
    (tmp_path / SCHEDULE_NAME).write_text(json.dumps(schedule_of(settings, chunks)))
    assert read_schedule(tmp_path) == (chunks, settings)


@pytest.mark.parametrize("change, said", [
    (lambda s: s.pop("settings"), "is not a T-LoRA schedule"),
    (lambda s: s["settings"].pop("trainer_type"), "its settings have no trainer_type"),
    (lambda s: s["settings"].update(min_rank="9"), "min_rank (9) must not exceed lora_rank (4)"),
    (lambda s: s["settings"].update(trainer_class="pixart_tlora"), "trainer_class must be one of"),
])
def test_a_schedule_that_does_not_check_is_one_line(tmp_path, change, said):
    import json

    from tlora.common.errors import UsageError
    from tlora.formats.diffusers_scheduled import SCHEDULE_NAME
    from tlora.formats.diffusers_scheduled import schedule as schedule_of
    from tlora.generate.scheduled import read_schedule

    from conftest import assert_helpful

    schedule = schedule_of(tlora.TLoRASettings("lora", 4, 2, family="sdxl"), [
        {"adapter": "c0", "file": "c0.safetensors", "components": [0, 4], "on_below": 1001}])
    change(schedule)
    (tmp_path / SCHEDULE_NAME).write_text(json.dumps(schedule))
    with pytest.raises(UsageError) as refused:
        read_schedule(tmp_path)
    line = str(refused.value)
    assert line.startswith(str(tmp_path / SCHEDULE_NAME)) and said in line and "export the T-LoRA again" in line
    assert_helpful(line)


def test_export_help_documents_every_format(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert all(f in text for f in ("diffusers:", "kohya:", "diffusers-scheduled:", "authors:", "timestep:T", "--rank"))
