"""The three CPU costs of the adapters, on SDXL's real architecture (random weights), printed as one JSON line each:

    python bench/adapter_cost.py step --resolution 128 --rank 64 --min_rank 32   # adapters' share of fwd+bwd
    python bench/adapter_cost.py compare --resolution 128 --steps 5             # the same, before and after in turn
    python bench/adapter_cost.py init --rank 64                                   # T-LoRA's initialisation (SVDs)
    python bench/adapter_cost.py load --precision bf16                            # host memory loading a saved SDXL

Run it from two checkouts (PYTHONPATH=<checkout>) in one shell loop to compare before and after.

`step`: the UNet's forward and backward as train.py runs it (DDPM noise, epsilon loss, autocast for bf16), the
frozen UNet alone (the adapters' scale 0, the latents carrying the gradient) against the same with the adapters,
median of `--steps` after one warm-up. `init`: `attach` with a fresh random start, timed. `load`: a fresh process loads
`--folder` (written once by `save`) with `load_pipeline` in the given precision and reads every weight once; peak
resident memory, and its anonymous part and its file-backed part (the memory-mapped checkpoint, pages the kernel
may drop at any time) separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdxl_architecture import UNET  # noqa: E402


def unet(dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).to(dtype).requires_grad_(False)


def settings(opts):
    from tlora.method.settings import TLoRASettings

    return TLoRASettings(opts.trainer_type, opts.rank, opts.min_rank, family="sdxl")


def fwd_bwd(model, dtype: torch.dtype, resolution: int, adapters: bool, tlora) -> float:
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, requires_grad=not adapters)
    embeds, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    tlora.set_scale(1.0 if adapters else 0.0)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        t = torch.randint(0, 1000, (1,))
        pred = model(latents.to(dtype), t, embeds.to(dtype),
                     added_cond_kwargs={"time_ids": time_ids.to(dtype), "text_embeds": pooled.to(dtype)}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
    loss.backward()
    for p in tlora.trainable_parameters():
        p.grad = None
    return time.perf_counter() - start


def step(opts) -> dict:
    from tlora.families import attach

    out = {}
    for name in opts.precisions.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model = unet(dtype)
        tlora = attach(model, settings(opts), init=False)
        timings = {True: [], False: []}
        for i in range(opts.steps + 1):
            for adapters in (False, True):
                seconds = fwd_bwd(model, dtype, opts.resolution, adapters, tlora)
                if i:
                    timings[adapters].append(seconds)
        base, full = statistics.median(timings[False]), statistics.median(timings[True])
        out[name] = {"frozen_unet_s": round(base, 3), "with_adapters_s": round(full, 3),
                     "adapters_share": round((full - base) / full, 3), "adapters_over_frozen": round(full / base - 1, 3)}
        tlora.unload()
        del model
    return out


def before_apply(parts, x, mask, out_dtype=None, frozen=None):
    """adapters.apply as it was in commit 467e35b: one stacked down-projection, x converted to float32
    first, the full mask cast in every adapter (the frozen start's cache, `frozen`, unused)."""
    rank = parts[0].down.shape[0]
    mask = getattr(mask, "mask", mask)  # a Masks: the call's mask
    down = parts[0].down if len(parts) == 1 else torch.cat([b.down for b in parts])
    h = F.linear(x.to(down.dtype), down)
    gate = None if parts[0].lam is None else torch.cat([b.lam for b in parts], dim=1)
    if mask is not None:
        m = mask[:, :rank].repeat(1, len(parts))
        gate = m if gate is None else gate * m.to(gate.device)
    if gate is not None:
        gate = gate.to(device=h.device, dtype=h.dtype)
        h = h * gate.reshape(gate.shape[0], *([1] * (h.dim() - 2)), gate.shape[1])
    pieces = h.split(rank, dim=-1)
    out = F.linear(pieces[0], parts[0].up)
    for piece, branch in zip(pieces[1:], parts[1:]):
        out = out + F.linear(piece, branch.up) if branch.sign > 0 else out - F.linear(piece, branch.up)
    return out.to(x.dtype if out_dtype is None else out_dtype)


def compare(opts) -> dict:
    """Before and after in one process, step by step in turn on the same timesteps: the frozen UNet, the
    adapters as in 467e35b (`before_apply`, full mask), as now (`adapters.apply`, the mask cut at the last
    active component on the CPU), and as now with the whole mask (what a GPU computes)."""
    import tlora.method.adapters as adapters
    from tlora.families import attach
    from tlora.method.injection import MaskState

    current, set_timestep = adapters.apply, MaskState.set_timestep
    variants = {"before": (before_apply, False), "after": (current, True), "after_whole_mask": (current, False)}
    out = {}
    for name in opts.precisions.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model = unet(dtype)
        tlora = attach(model, settings(opts), init=False)
        times: dict[str, list[float]] = {"frozen": [], **{v: [] for v in variants}}
        for i in range(opts.steps + 1):
            for variant in times:
                apply, cut = variants.get(variant, (current, True))
                adapters.apply = apply
                MaskState.set_timestep = set_timestep if cut else _uncut(set_timestep)
                torch.manual_seed(1000 + i)  # the same timestep for every variant of a step
                seconds = fwd_bwd(model, dtype, opts.resolution, variant != "frozen", tlora)
                if i:
                    times[variant].append(seconds)
        adapters.apply, MaskState.set_timestep = current, set_timestep
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"frozen_unet_s": round(med["frozen"], 3)} | {
            f"{v}_adapters_s": round(med[v] - med["frozen"], 3) for v in variants} | {
            f"{v}_share": round((med[v] - med["frozen"]) / med[v], 3) for v in variants}
        tlora.unload()
        del model
    return out


def _uncut(set_timestep):
    from tlora.method.adapters import Masks

    def full_mask(state, timestep, device):
        set_timestep(state, timestep, device)
        state.active = state.mask
        state.masks = None if state.mask is None else Masks(state.mask)
    return full_mask


def init(opts) -> dict:
    from tlora.families import attach

    model = unet(torch.float32)
    torch.manual_seed(0)
    start = time.perf_counter()
    tlora = attach(model, settings(opts))
    seconds = time.perf_counter() - start
    state = tlora.state_dict()
    lam = torch.cat([v.flatten() for k, v in state.items() if k.endswith("lambda_layer")])
    return {"init_s": round(seconds, 1), "adapters": len(tlora.adapters), "lambda_mean": float(lam.mean()),
            "lambda_std": float(lam.std())}


def save(opts) -> dict:
    from sdxl_architecture import build_sdxl_architecture

    build_sdxl_architecture().save_pretrained(opts.folder)
    return {"saved": opts.folder}


def load(opts) -> dict:
    from tlora.families import FAMILIES
    from tlora.families.pipelines import DTYPES, load_pipeline

    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]) * 1024)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    pipe = load_pipeline(opts.folder, "none", dtype=DTYPES[opts.precision], family=FAMILIES["sdxl"])
    seconds = time.perf_counter() - start
    with torch.no_grad():  # read every weight once, as the first step does (a lazily mapped file is read here)
        total = sum(float(p.float().sum()) for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
                    for p in part.parameters())
    time.sleep(0.05)
    dtypes = sorted({str(p.dtype) for p in pipe.unet.parameters()})
    return {"precision": opts.precision, "load_s": round(seconds, 1), "unet_dtypes": dtypes, "checksum": total} | {
        f"peak_{k}_gb": round(v / 2**30, 2) for k, v in peak.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "compare", "init", "save", "load"])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--min_rank", type=int, default=32)
    p.add_argument("--trainer_type", default="ortho_lora")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--folder", default="/tmp/sdxl-architecture")
    opts = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"what": opts.what, "torch": torch.__version__} | globals()[opts.what](opts)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
