"""Seconds per denoising step: the base model, `tlora.load`, and a `diffusers-scheduled` export switched
by `tlora.scheduled` (the exact T-LoRA through diffusers' own LoRA layers).

    python bench/scheduled_cost.py --model tiny --resolution 64
    python bench/scheduled_cost.py --model sdxl --resolution 128 --steps 4      # SDXL architecture, random weights

The T-LoRA is rank 64 / min_rank 32 on SDXL (33 chunks), rank 8 / 4 on the tiny model; its values are
random (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tlora  # noqa: F401  (first: quiets transformers' torchvision notice)
from tlora.interop.exporting import main as export
from tlora.runs.weights import save_weights


def build(model: str, scratch: Path):
    from tlora.families.pipelines import load_pipeline

    if model == "tiny":
        from tlora.families.tiny_models import BUILDERS

        return load_pipeline(str(BUILDERS["sdxl"](scratch / "tiny")), "none"), 8, 4
    from sdxl_architecture import build_sdxl_architecture

    return build_sdxl_architecture(), 64, 32


def seconds_per_step(pipe, steps: int, resolution: int, callback=None) -> float:
    times = []

    def tick(p, i, t, kwargs):
        times.append(time.perf_counter())
        return callback(p, i, t, kwargs) if callback else kwargs

    pipe("a photo of sks dog", num_inference_steps=steps, height=resolution, width=resolution,
         generator=torch.Generator().manual_seed(0), callback_on_step_end=tick, output_type="latent")
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", choices=["tiny", "sdxl"], default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    opts = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tlora-sched-"))
    pipe, rank, min_rank = build(opts.model, scratch)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    adapters = tlora.attach(pipe.unet, tlora.TLoRASettings("ortho_lora", rank, min_rank), init=False)
    save_weights(adapters.state_dict(), scratch / "checkpoint-1", adapters.settings.to_metadata())
    adapters.unload()
    export([str(scratch / "checkpoint-1"), "--format", "diffusers-scheduled", "--out", str(scratch / "scheduled")])
    rows = {"base model": seconds_per_step(pipe, opts.steps, opts.resolution)}
    tlora.load(pipe, scratch / "checkpoint-1")
    rows["tlora.load"] = seconds_per_step(pipe, opts.steps, opts.resolution)
    tlora.unload(pipe)
    start = time.perf_counter()
    step = tlora.scheduled(pipe, scratch / "scheduled", num_inference_steps=opts.steps)
    load_s = time.perf_counter() - start
    rows[f"tlora.scheduled ({len(step.chunks)} chunks)"] = seconds_per_step(pipe, opts.steps, opts.resolution, step)
    print(f"{opts.model}, {opts.resolution} px, ortho_lora rank {rank}/{min_rank}, CPU, torch {torch.__version__}; "
          f"loading the chunks took {load_s:.1f} s")
    print("| path | s / denoising step | vs base |\n|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s:.4f} | {s / rows['base model']:.2f}x |")


if __name__ == "__main__":
    main()
