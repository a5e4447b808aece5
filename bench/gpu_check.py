"""Every CUDA path once, with the estimator's prediction beside what the GPU measured: one table and one JSON.

    python bench/gpu_check.py                    # one H100/H200: SDXL and FLUX.1-dev architectures (random weights)
    python bench/gpu_check.py --smoke            # the same code paths on the tiny models, on the CPU (in the tests)

Cases: SDXL at 1024 px, T-LoRA rank 64/32, in fp32 (the authors' setting), bf16 + gradient checkpointing,
+ 8-bit Adam, fp16 + gradient checkpointing; FLUX.1-dev at full size, Vanilla T-LoRA rank 16, in bf16 and with a
4-bit (nf4) base + gradient checkpointing + 8-bit Adam; SDXL bf16 + checkpointing and FLUX.1-dev bf16 again with
`--compile` (CUDA only: compiling adds minutes); 1024 px inference with the T-LoRA (25 steps); exact resume in
deterministic mode (4 steps against 2 + resume + 2, bitwise). Each training case times `--steps` steps of
train.py's Trainer after one warm-up (which compiles) and reads torch.cuda.max_memory_allocated(), beside the
estimator's step-time range for the same flags, eager or compiled, on the estimator's GPU nearest the device: the
measurements that calibrate tlora/train/step_time.py. Any exception stops the check with a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (the resume case), before CUDA

from accelerate.state import AcceleratorState  # noqa: E402

from tlora.train.estimator import estimate  # noqa: E402
from tlora.train.estimator import parse_args as estimate_args
from tlora.train.options import TrainOptions, parse_args  # noqa: E402
from tlora.train.step_time import GPUS  # noqa: E402
from tlora.train.trainer import Trainer  # noqa: E402

CUDA = torch.cuda.is_available()
COMPILE = "compile" in {f.name for f in dataclasses.fields(TrainOptions)}  # train.py's --compile
SDXL = ["--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora", "--lora_rank", "64", "--min_rank", "32"]
FLUX = ["--trainer_type", "lora", "--trainer_class", "flux_tlora", "--lora_rank", "16", "--min_rank", "8",
        "--max_sequence_length", "512"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def models(scratch: Path, smoke: bool) -> dict[str, tuple[str, str, object]]:
    """family -> (model folder for train.py, the estimator's name for it, a pipeline in memory or None). SDXL is
    built once in memory and shared by its cases (its folder holds model_index.json only, for the option checks);
    FLUX is saved with random weights in bf16, so that train.py loads it, and quantizes it for the 4-bit case."""
    from tlora.families.pipelines import load_pipeline

    if smoke:
        from tlora.families.tiny_models import BUILDERS

        sdxl, flux = str(BUILDERS["sdxl"](scratch / "sdxl")), str(BUILDERS["flux"](scratch / "flux"))
        return {"sdxl": (sdxl, sdxl, load_pipeline(sdxl, "none")), "flux": (flux, flux, None)}
    from flux_architecture import build_flux_architecture
    from sdxl_architecture import build_sdxl_architecture

    build_flux_architecture(t5_layers=1, dtype=torch.bfloat16).save_pretrained(scratch / "flux")
    sdxl = build_sdxl_architecture()
    sdxl.save_config(scratch / "sdxl")
    return {"sdxl": (str(scratch / "sdxl"), "sdxl", sdxl), "flux": (str(scratch / "flux"), "flux-dev", None)}


def replaced(flags: list[str], extra: list[str]) -> list[str]:
    """`flags` with the flag-value pairs of `extra` in place of its own (train.py refuses a flag given twice)."""
    names = set(extra[::2])
    kept = [item for i in range(0, len(flags), 2) if flags[i] not in names for item in flags[i:i + 2]]
    return kept + extra


def argv(folder: str, data: Path, out: Path, resolution: int, extra: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", folder, "--pretrained_vae_model_name_or_path", "none",
            "--train_data_dir", str(data), "--output_dir", str(out), "--class_name", "dog", "--placeholder_token",
            "sks", "--resolution", str(resolution), "--num_train_epochs", "1000", "--checkpointing_steps", "1000",
            "--optimizer", "adamw", "--learning_rate", "1e-4", *extra]


def train_case(name: str, flags: list[str], estimate_name: str, steps: int, pipe=None) -> dict:
    """`steps` timed steps of train.py's Trainer after one warm-up (`pipe`: a pipeline in memory, in the run's
    precision); set-up time (loading, T-LoRA's SVDs on the GPU, caching) is reported apart."""
    from tlora.families.pipelines import DTYPES

    AcceleratorState._reset_state(reset_partial_state=True)
    opts = parse_args(flags)
    if pipe is not None:
        pipe.to(dtype=DTYPES[opts.mixed_precision])
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    trainer = Trainer(opts, pipe=pipe)
    trainer.setup()
    sync()
    setup_seconds = time.perf_counter() - start
    times = []
    for _ in range(steps + 1):
        sync()
        start = time.perf_counter()
        trainer.step(next(trainer.batches()))
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    trainer.end()
    trainer.lock.release()
    trainer.tlora.unload()
    trainer.family.model(trainer.pipe).disable_gradient_checkpointing()
    if pipe is not None:
        pipe.to("cpu")
    est_flags = [f for f in flags]
    est_flags[est_flags.index("--pretrained_model_name_or_path") + 1] = estimate_name
    predicted = estimate(estimate_args([f for f in est_flags if f != "--compile"])[0], _source(estimate_name))
    del trainer
    return {"case": name, "mode": "compiled" if "--compile" in flags else "eager",
            "s_per_step": round(statistics.median(times[1:]), 3), "setup_s": round(setup_seconds, 1),
            "peak_gb": round(peak, 2), "estimated_peak_gb": predicted.peak_gb,
            "estimated_step_gb": predicted.step["peak_gb"], "estimated_s": predicted.step_seconds,
            "tflops_per_step": predicted.tflops_per_step}


def nearest_gpu(device: str) -> str:
    """The estimator's GPU named in `device` (H100 for any other: an H200 is an H100 with more memory)."""
    return next((gpu for gpu in GPUS if gpu.split()[-1] in device), "H100")


def _source(name: str) -> str:
    from tlora.train.estimator import model_source

    return model_source(name, None)


def inference_case(pipe, resolution: int, steps: int) -> dict:
    """A T-LoRA attached to the SDXL pipeline (fp16 on a GPU), one image at `resolution`, `steps` denoising steps."""
    from tlora.families import attach
    from tlora.method.settings import TLoRASettings

    pipe.to("cuda" if CUDA else "cpu", torch.float16 if CUDA else torch.float32)
    tlora = attach(pipe.unet, TLoRASettings("ortho_lora", 64, 32), init=False)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    pipe("a photo of sks dog", num_inference_steps=steps, height=resolution, width=resolution, output_type="np")
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    tlora.unload()
    return {"case": f"SDXL inference {resolution} px, {steps} steps", "s_per_image": round(seconds, 2),
            "peak_gb": round(peak, 2)}


def resume_case(flags: list[str], out: Path) -> dict:
    """4 steps in one run against 2 steps, then the run resumed to 4, in deterministic mode: equal bit for bit."""
    from safetensors.torch import load_file

    from tlora.train.trainer import train

    torch.use_deterministic_algorithms(True, warn_only=True)  # kernels without a deterministic version warn
    runs = []
    try:
        for folder, extra in (("a", ["--num_train_epochs", "4"]), ("b", ["--num_train_epochs", "2"]),
                              ("b", ["--num_train_epochs", "4", "--resume_from_checkpoint", "latest"])):
            AcceleratorState._reset_state(reset_partial_state=True)
            flags_here = replaced(flags, ["--checkpointing_steps", "2", "--output_dir", str(out / folder), *extra])
            runs.append(train(parse_args(flags_here)))
    finally:
        torch.use_deterministic_algorithms(False)
    whole, resumed = (load_file(str(run / "checkpoint-4" / "pytorch_lora_weights.safetensors")) for run in runs[::2])
    equal = whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    if not equal:
        raise AssertionError("the resumed run differs from the uninterrupted one")
    return {"case": "exact resume (deterministic), 4 steps = 2 + resume + 2", "equal": equal}


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="Tiny models on the CPU (what the tests run).")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default=None, help="Also write the JSON here.")
    opts = p.parse_args(argv_)
    if not CUDA and not opts.smoke:
        print("error: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="tlora-gpu-check-"))
    data = scratch / "concept"
    data.mkdir()
    Image.fromarray((np.random.RandomState(0).rand(512, 512, 3) * 255).astype("uint8")).save(data / "00.jpg")
    folders = models(scratch, opts.smoke)
    res, flux_res = (64, 64) if opts.smoke else (1024, 1024)
    sdxl = lambda name, extra: (name, argv(folders["sdxl"][0], data, scratch / "runs", res, SDXL + extra),  # noqa: E731
                                folders["sdxl"][1], folders["sdxl"][2])
    flux = lambda name, extra: (name, argv(folders["flux"][0], data, scratch / "runs", flux_res, FLUX + extra),  # noqa: E731
                                folders["flux"][1], None)
    cases = [sdxl("SDXL fp32 (the authors' setting)", ["--mixed_precision", "no"]),
             sdxl("SDXL bf16 + gradient checkpointing", ["--mixed_precision", "bf16", "--gradient_checkpointing"])]
    if CUDA:  # bitsandbytes and fp16 autocast need CUDA
        cases += [sdxl("SDXL bf16 + checkpointing + 8-bit Adam", ["--mixed_precision", "bf16",
                                                                 "--gradient_checkpointing", "--use_8bit_adam"]),
                  sdxl("SDXL fp16 + gradient checkpointing", ["--mixed_precision", "fp16", "--gradient_checkpointing"])]
    cases.append(flux("FLUX.1-dev bf16", ["--mixed_precision", "bf16"]))
    if CUDA:
        cases.append(flux("FLUX.1-dev nf4 base + checkpointing + 8-bit Adam",
                          ["--mixed_precision", "bf16", "--base_model_precision", "nf4-bnb",
                           "--gradient_checkpointing", "--use_8bit_adam"]))
    if CUDA and COMPILE:  # inductor on the CPU would take minutes for the smoke test; before --compile: eager only
        cases += [sdxl("SDXL bf16 + gradient checkpointing, compiled", ["--mixed_precision", "bf16",
                                                                         "--gradient_checkpointing", "--compile"]),
                  flux("FLUX.1-dev bf16, compiled", ["--mixed_precision", "bf16", "--compile"])]
    rows = [train_case(name, flags, est, opts.steps, pipe) for name, flags, est, pipe in cases]
    rows.append(inference_case(folders["sdxl"][2], res, 2 if opts.smoke else 25))
    tiny = folders["sdxl"][0] if opts.smoke else str(__import__("tlora.families.tiny_models", fromlist=["x"])
                                                     .BUILDERS["sdxl"](scratch / "tiny"))
    rows.append(resume_case(argv(tiny, data, scratch / "resume", 64, SDXL[:4] + ["--lora_rank", "4", "--min_rank",
                                                                                   "2"]), scratch / "resume"))
    device = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores), smoke"
    gpu = nearest_gpu(device)
    print(f"device: {device}, torch {torch.__version__}\n")
    print(f"| case | s/step (or s/image) | set-up s | peak GB | estimated peak GB (step) | estimated {gpu} s/step, "
          "low-high | TFLOPs/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "s_per_step" in r:
            low, high = r["estimated_s"][gpu][r["mode"]]
            print(f"| {r['case']} | {r['s_per_step']} | {r['setup_s']} | {r['peak_gb']} | {r['estimated_peak_gb']} "
                  f"({r['estimated_step_gb']}) | {low}-{high} ({r['mode']}) | {r['tflops_per_step']} |")
        elif "s_per_image" in r:
            print(f"| {r['case']} | {r['s_per_image']} | | {r['peak_gb']} | | | |")
        else:
            print(f"| {r['case']} | equal: {r['equal']} | | | | | |")
    out = json.dumps({"device": device, "estimator_gpu": gpu, "torch": torch.__version__, "rows": rows})
    print(out)
    if opts.output:
        Path(opts.output).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
