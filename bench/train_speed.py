"""Training speed and memory of train.py's real training step, configurations side by side.

    python bench/train_speed.py --model tiny --resolution 64
    python bench/train_speed.py --model sdxl --resolution 128 --steps 3      # SDXL architecture, random weights
    python bench/train_speed.py --model sdxl --resolution 1024 --precisions bf16 --cache on   # on a GPU
    python bench/train_speed.py --model flux --flux_heads 6 --resolution 128 --steps 3   # FLUX.1-dev, 1/4 width
    python bench/train_speed.py --model tiny-flux --trainer_type lora --rank 4 --min_rank 1
    python bench/train_speed.py --model sdxl --resolution 128 --steps 3 --precisions bf16 --cache on \
      --checkpointing off --compile off,on                                  # eager and --compile side by side

For each configuration (compile off/on x cache on/off x precision x gradient checkpointing) it runs `--warmup`
steps, then `--steps` timed steps of `Trainer.step`, and prints a markdown table: the first step's seconds (with
--compile: the compilation), median seconds per step, the mean split (data, VAE, text, denoiser forward+backward,
optimizer), the adapters' share (denoiser forward+backward with adapters minus without), the share of the step
outside the denoiser and optimizer, peak host RSS and peak GPU memory. "cache off" is the authors' loop: a new
data iterator, image decode + crop + VAE encode and prompt encode every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate.state import AcceleratorState  # noqa: E402

from tlora import families  # noqa: E402
from tlora.families import attach  # noqa: E402
from tlora.families.pipelines import DTYPES, load_pipeline  # noqa: E402
from tlora.method.settings import TLoRASettings  # noqa: E402
from tlora.train.options import parse_args  # noqa: E402
from tlora.train.timing import SectionTimer  # noqa: E402
from tlora.train.trainer import Trainer, diffusion_loss  # noqa: E402

SECTIONS = ("data", "vae", "text", "denoiser", "optimizer")


class PeakRSS:
    """Samples this process's resident memory every 20 ms; `peak` is the highest since `reset`."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def reset(self) -> None:
        self.peak = self.now()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(opts, scratch: Path):
    """The pipeline, built in half precision when no configuration is fp32 (SDXL: 6.7 GB instead of 13.3 GB)."""
    precisions = opts.precisions.split(",")
    dtype = torch.float32 if "fp32" in precisions else DTYPES[precisions[0]]
    if opts.model in ("tiny", "tiny-flux"):
        from tlora.families.tiny_models import BUILDERS

        build = BUILDERS["flux" if opts.model == "tiny-flux" else "sdxl"]
        return load_pipeline(str(build(scratch / "tiny")), "none")
    if opts.model == "flux":
        from flux_architecture import build_flux_architecture

        return build_flux_architecture(opts.flux_heads, dtype=dtype)
    from sdxl_architecture import build_sdxl_architecture

    return build_sdxl_architecture(dtype)


def train_argv(opts, data: Path, out: Path, precision: str, checkpointing: bool, compiled: bool) -> list[str]:
    family = "flux" if "flux" in opts.model else "sdxl"
    argv = [
        "--trainer_type", opts.trainer_type, "--trainer_class", f"{family}_tlora", "--pretrained_model_name_or_path",
        str(out.parent / "model"), "--pretrained_vae_model_name_or_path", "none", "--train_data_dir", str(data),
        "--output_dir", str(out), "--class_name", "dog",
        "--placeholder_token", "sks", "--resolution", str(opts.resolution), "--lora_rank", str(opts.rank),
        "--min_rank", str(opts.min_rank), "--num_train_epochs", "1000000", "--checkpointing_steps", "1000000",
        "--mixed_precision", "no" if precision == "fp32" else precision, "--dataloader_num_workers", "1",
        "--optimizer", "adamw", "--learning_rate", "1e-4",
    ] + (["--max_sequence_length", "512"] if family == "flux" else [])
    flags = {"--gradient_checkpointing": checkpointing, "--allow_tf32": opts.tf32, "--compile": compiled}
    return argv + [name for name, given in flags.items() if given]


def denoiser_seconds(trainer: Trainer, steps: int, adapters: bool) -> float:
    """Median denoiser forward+backward time; without adapters the input latents carry the gradient instead."""
    batch = trainer.conditioning.batch(next(trainer.batches()))
    if not adapters:
        batch["mean"] = batch["mean"].detach().requires_grad_(True)
    trainer.tlora.set_scale(1.0 if adapters else 0.0)
    times = []
    for _ in range(steps + 1):
        sync(trainer.device)
        start = time.perf_counter()
        with trainer.accelerator.autocast():
            loss = diffusion_loss(trainer.family, trainer.model, trainer.pipe, trainer.scheduler, batch,
                                  trainer.weight_dtype, None)
        loss.backward()
        sync(trainer.device)
        times.append(time.perf_counter() - start)
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.tlora.set_scale(1.0)
    return statistics.median(times[1:])


def initial_adapters(opts, pipe) -> tuple[dict, float]:
    """T-LoRA's initialisation (one SVD per projection, on the accelerator when there is one), timed once;
    every configuration then starts from these adapters."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = families.denoiser(pipe)
    model.to(device)
    sync(device)
    start = time.perf_counter()
    tlora = attach(model, TLoRASettings(opts.trainer_type, opts.rank, opts.min_rank), svd_device=device)
    sync(device)
    seconds = time.perf_counter() - start
    state = tlora.state_dict()
    tlora.unload()
    return state, seconds


def run_config(opts, pipe, data, scratch, rss, state, precision, cache, checkpointing, compiled) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    args = parse_args(train_argv(opts, data, scratch / "runs", precision, checkpointing, compiled))
    timer = SectionTimer("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(dtype=DTYPES[args.mixed_precision])
    trainer = Trainer(args, cache=cache, pipe=pipe, adapter_state=state["adapters"], timer=timer)
    trainer.setup()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss.reset()
    batches = trainer.batches()
    step_times = []
    for i in range(opts.warmup + opts.steps):
        if i == opts.warmup:
            timer.reset()
        sync(trainer.device)
        t0 = time.perf_counter()
        with timer("data"):
            indices = next(batches)
        trainer.step(indices)
        sync(trainer.device)
        step_times.append(time.perf_counter() - t0)
    row = {k: timer.totals.get(k, 0.0) / opts.steps for k in SECTIONS}
    row["first"], row["step"] = step_times[0], statistics.median(step_times[opts.warmup:])
    row["rss"] = rss.peak / 2**30
    row["gpu"] = torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else float("nan")
    with_adapters = denoiser_seconds(trainer, opts.adapter_steps, True)
    row["adapters"] = with_adapters - denoiser_seconds(trainer, opts.adapter_steps, False)
    trainer.tlora.unload()
    families.denoiser(pipe).disable_gradient_checkpointing()
    trainer.end()
    return row


def table(rows: list[tuple[str, dict]], opts, init_seconds: float) -> str:
    head = ("| configuration | first step s | s/step (median) | data | VAE | text | denoiser fwd+bwd | optimizer | "
            "adapters | outside denoiser+opt | peak RSS GB | peak GPU GB |")
    lines = [head, "|" + "---|" * 12]
    for name, r in rows:
        outside = r["data"] + r["vae"] + r["text"]
        total = sum(r[k] for k in SECTIONS)
        lines.append(
            f"| {name} | {r['first']:.1f} | {r['step']:.4f} | {r['data']:.4f} | {r['vae']:.4f} | {r['text']:.4f} | "
            f"{r['denoiser']:.4f} | "
            f"{r['optimizer']:.4f} | {r['adapters']:.4f} ({100 * r['adapters'] / r['step']:.0f}%) | "
            f"{100 * outside / total:.1f}% | {r['rss']:.2f} | {r['gpu']:.2f} |"
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"model {opts.model}, {opts.resolution} px, {opts.trainer_type} rank {opts.rank}/{opts.min_rank}, "
            f"batch 1, {device}, torch {torch.__version__}; adapter initialisation (SVDs): {init_seconds:.1f} s\n\n"
            + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", choices=["tiny", "sdxl", "tiny-flux", "flux"], default="tiny")
    p.add_argument("--flux_heads", type=int, default=24,
                   help="FLUX transformer width in heads of 128 (24 = FLUX.1-dev)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--adapter_steps", type=int, default=2)
    p.add_argument("--trainer_type", choices=["lora", "ortho_lora"], default="ortho_lora")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--min_rank", type=int, default=32)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--cache", default="off,on")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", default="off", help="off, on or off,on: train.py's --compile (the compiled "
                   "configurations run last: the model stays compiled)")
    p.add_argument("--output", type=str, default=None, help="Also write the table to this file.")
    opts = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tlora-bench-"))
    data = scratch / "concept"
    data.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(1200, 1280, 3) * 255).astype("uint8")).save(data / "00.jpg")
    rss = PeakRSS()
    pipe = build_model(opts, scratch)
    pipe.save_config(scratch / "model")  # model_index.json only: the options check a model folder; the pipe is here
    state: dict = {}
    state["adapters"], state["init_seconds"] = initial_adapters(opts, pipe)
    print(f"adapter initialisation: {state['init_seconds']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    compile_modes = sorted(opts.compile.split(","), key=["off", "on"].index)
    configs = [(compiled, precision, cache, ckpt) for compiled in compile_modes
               for precision in opts.precisions.split(",") for cache in opts.cache.split(",")
               for ckpt in opts.checkpointing.split(",")]
    for compiled, precision, cache, ckpt in configs:
        name = f"cache {cache}, {precision}, checkpointing {ckpt}" + (", --compile" if compiled == "on" else "")
        row = run_config(opts, pipe, data, scratch, rss, state, precision, cache == "on", ckpt == "on",
                         compiled == "on")
        rows.append((name, row))
        print(f"{name}: first step {row['first']:.1f} s, {row['step']:.4f} s/step", file=sys.stderr, flush=True)
    out = table(rows, opts, state["init_seconds"])
    print(out)
    if opts.output:
        Path(opts.output).write_text(out + "\n")


if __name__ == "__main__":
    main()
