"""Operations and bytes of one denoiser forward + backward, traced on the `meta` device as the estimator traces a
step: the aten operations dispatched (a proxy for GPU kernel launches) and the bytes their outputs allocate, for
the frozen denoiser alone, with a peft LoRA of the same rank on the same layers, and with the T-LoRA (lora and
ortho_lora).

    python bench/launch_count.py                                  # sdxl and klein-4b at 1024 px (minutes on a CPU)
    python bench/launch_count.py --model klein-4b --resolution 512

The adapters' share is the difference from the frozen denoiser; the ratios compare it with peft's. "zero-filled"
counts the operations that make or fill a tensor with zeros (a zero block would show there).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlora.train.step_time import VIEWS as SKIP  # noqa: E402  views: no kernel of their own (as the estimator)


class Count(TorchDispatchMode):
    """aten operations that run a kernel (views left out) and the bytes of the tensors they return."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name not in SKIP:
            self.ops[name] += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


ZEROS = {"aten.zeros.default", "aten.new_zeros.default", "aten.zeros_like.default", "aten.zero_.default",
         "aten.fill_.Scalar", "aten.full.default", "aten.new_full.default", "aten.full_like.default"}


def measure(model_name: str, resolution: int, variant: str, rank: int) -> tuple[int, int, int]:
    """(operations, bytes, zero-filled tensors) of one forward + backward of the loss with the adapters of `variant`."""
    from tlora.families.architectures import empty_pipeline
    from tlora.train.estimator import conditioning, parse_args
    from tlora.train.objective import diffusion_loss
    from tlora.train.tracing import GPUKernels

    opts, _ = parse_args(["--pretrained_model_name_or_path", model_name, "--resolution", str(resolution),
                          "--rank", str(rank), "--min_rank", "1", "--trainer_type", variant if variant in
                          ("lora", "ortho_lora") else "lora", "--mixed_precision", "bf16", "--tlora"])
    family = opts.recipe
    pipe = empty_pipeline(model_name, torch.bfloat16)
    family.prepare(pipe, torch.bfloat16)
    model = family.model(pipe)
    paths = [layer.path for layer in family.describe(model).layers if layer.path is not None]
    if variant == "peft":
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(set(paths))))
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:  # trained in float32, as diffusers' training scripts cast them (cast_training_params)
            p.data = p.data.float()
    elif variant in ("lora", "ortho_lora"):
        from accelerate import init_empty_weights

        from tlora.runs.hparams import from_hparams

        with init_empty_weights(include_buffers=False):
            tlora = family.attach(model, from_hparams(vars(opts), "train.py"), init=False)
        params = tlora.trainable_parameters()
    else:
        params = []
    for p in params:
        p.requires_grad_(True)
    scheduler = family.noise_scheduler(pipe)
    batch = conditioning(family, model, opts, torch.bfloat16, torch.device("meta"))
    batch["mean"].requires_grad_(True)  # the backward runs through the frozen denoiser in every variant alike
    with torch.no_grad(), GPUKernels(torch.bfloat16):  # a first call makes what is kept between steps (the T-LoRA's
        diffusion_loss(family, model, pipe, scheduler, batch, torch.bfloat16, None, 1.0)  # frozen start, cast once)
    count = Count()
    with count, GPUKernels(torch.bfloat16):  # CUDA's autocast and attention kernels, as the estimator traces them
        loss = diffusion_loss(family, model, pipe, scheduler, batch, torch.bfloat16, None, 1.0)
        loss.backward()
    return sum(count.ops.values()), count.bytes, sum(n for op, n in count.ops.items() if op in ZEROS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, help="A published name (default: sdxl, klein-4b).")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    opts = p.parse_args(argv)
    for name in opts.model or ["sdxl", "klein-4b"]:
        rows = {v: measure(name, opts.resolution, v, opts.rank) for v in ("frozen", "peft", "lora", "ortho_lora")}
        frozen_ops, frozen_bytes, _ = rows["frozen"]
        peft_ops = rows["peft"][0] - frozen_ops
        print(f"\n{name} at {opts.resolution} px, rank {opts.rank}, bf16 autocast, forward + backward (traced on meta)")
        print(f"{'':12s} {'operations':>11s} {'added':>8s} {'vs peft':>8s} {'GB allocated':>13s} {'zero-filled':>12s}")
        for variant, (ops, nbytes, zeros) in rows.items():
            added = ops - frozen_ops
            ratio = f"{added / peft_ops:.2f}x" if variant in ("lora", "ortho_lora") and peft_ops else ""
            print(f"{variant:12s} {ops:11d} {added if variant != 'frozen' else '':>8} {ratio:>8s} {nbytes / 1e9:13.2f}"
                  f" {zeros:12d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
