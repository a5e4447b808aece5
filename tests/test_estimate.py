"""The estimator: train.py's step traced on the meta device, against the same step run for real on the CPU."""

import json

import pytest
import torch

from tlora.families.pipelines import load_pipeline
from tlora.train.estimator import main, parse_args, trace_step
from tlora.train.step_time import GPUS

FLAGS = ["--resolution", "64", "--lora_rank", "4", "--min_rank", "2", "--trainer_type", "ortho_lora"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--gradient_checkpointing"]], ids=["plain", "checkpointing"])
def test_the_meta_trace_is_the_real_steps_tracked_peak(tiny_sdxl, extra):
    """Peak live bytes of one steady-state step (weights, adapters, gradients, AdamW state, activations): traced on
    meta with CUDA's attention kernels modelled, against the same step run on the CPU (its own flash attention)."""
    opts, _ = parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl), *FLAGS, *extra])
    traced = trace_step(opts, str(tiny_sdxl))
    real = trace_step(opts, pipe=load_pipeline(str(tiny_sdxl), "none"))
    for kind in ("weights", "adapters", "optimizer"):
        assert traced["split"][kind] == real["split"][kind] > 0
    peak, tracked = sum(traced["split"].values()), sum(real["split"].values())
    assert abs(peak / tracked - 1) < 0.02
    assert abs(traced["split"]["activations"] / real["split"]["activations"] - 1) < 0.1
    # 2 x 2 x 4 x 4 bytes of AdamW moments per trainable value; the frozen start doubles the adapters' bytes
    assert traced["split"]["optimizer"] == 2 * 4 * sum(traced["numels"]) == traced["split"]["adapters"]


@pytest.mark.slow
def test_json_answers_for_a_shipped_architecture_and_the_formula_parts(capsys):
    """`--json` for a named architecture (no download): peak, FLOPs and seconds per step, eager and compiled; 8-bit
    Adam and a 4-bit base lower the memory by their formulas, and say so; the 4-bit base costs time (each weight
    unpacked at each use)."""
    base = ["--pretrained_model_name_or_path", "klein-4b", "--resolution", "256", "--rank", "4", "--min_rank", "4",
            "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--use_8bit_adam", "--optimizer", "adamw", "--base_model_precision", "nf4-bnb"]) == 0
    lean = json.loads(capsys.readouterr().out)
    assert plain["tflops_per_step"] == lean["tflops_per_step"] > 0
    assert 0 < lean["peak_gb"] < plain["peak_gb"]
    assert plain["step"]["weights"] - lean["step"]["weights"] > 4  # 4 B parameters: 2 bytes -> about 0.56
    assert any("nf4-bnb" in line for line in lean["by_formula"])
    assert any("8-bit AdamW" in line for line in lean["by_formula"])
    assert plain["options"]["adapters"] == 5 * 7 + 20 * 3
    assert list(plain["step_seconds"]) == ["A100", "H100", "RTX 4090", "L40S"]
    for gpu, modes in plain["step_seconds"].items():
        (low, high), (compiled_low, compiled_high) = modes["eager"], modes["compiled"]
        assert 0 < low < high and 0 < compiled_low < compiled_high <= high
    assert plain["kernels_per_step"]["compiled"] < plain["kernels_per_step"]["eager"]
    assert main(base + ["--base_model_precision", "nf4-bnb"]) == 0
    unpacked = json.loads(capsys.readouterr().out)
    assert unpacked["kernels_per_step"]["eager"] > plain["kernels_per_step"]["eager"]
    assert all(a > b for gpu in GPUS for a, b in zip(unpacked["step_seconds"][gpu]["eager"],
                                                     plain["step_seconds"][gpu]["eager"]))


def test_bad_input_is_one_line_before_anything_is_built(capsys):
    assert main(["--pretrained_model_name_or_path", "sdxl", "--utilization", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --utilization must be a finite number in (0, 1]")
    assert main(["--pretrained_model_name_or_path", "sdxl", "--resolution", "1001"]) == 2
    assert "--resolution" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_names_the_options_that_fit(capsys):
    """klein-4b in fp32 holds 31 GB at set-up (transformer and Qwen3 in fp32); --fit 20 adds bf16 and stops there."""
    args = ["--pretrained_model_name_or_path", "klein-4b", "--resolution", "64", "--rank", "4", "--min_rank", "4",
            "--mixed_precision", "no"]
    assert main(args + ["--json", "--fit", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fit"]["fits"] and out["fit"]["add"] == ["--mixed_precision bf16"]
    assert out["fit"]["peak_gb"] + 0.75 <= 20 < out["peak_gb"] + 0.75
    assert torch.get_default_dtype() == torch.float32  # the estimate changed no global state of torch


@pytest.mark.slow
def test_fit_names_the_encoders_when_no_option_is_enough(capsys):
    """klein-4b's set-up (its Qwen3-4B text encoder on the device beside the transformer) is above 8 GB whatever
    the options: one line says so, with the encoders' share and the GPU size that fits."""
    args = ["--pretrained_model_name_or_path", "klein-4b", "--resolution", "256", "--rank", "4", "--min_rank", "4"]
    assert main(args + ["--fit", "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--fit 8: ")]
    assert len(lines) == 2 and "does not fit even" in lines[0]
    assert "the text and image encoders" in lines[1] and "use a GPU with at least" in lines[1]
