"""The estimated GPU memory of every published model tlora ships an architecture for, as README's family table
gives it: `python -m tlora.estimate` at the model's native size, with and without gradient checkpointing.

    python bench/family_memory.py                # every published model (minutes on a CPU)
    python bench/family_memory.py --only sd15    # one

Prints one line per model: the flags, then the peak (GB) without and with --gradient_checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

# name -> train.py flags of README's row (native size, the family's rank, bf16 but where the authors train in fp32)
ROWS = {
    "sdxl": "--resolution 1024 --lora_rank 64 --min_rank 32 --trainer_type ortho_lora",
    "sd15": "--resolution 512 --lora_rank 4 --min_rank 1 --trainer_type ortho_lora",
    "sd3.5-medium": "--resolution 1024 --lora_rank 16 --min_rank 8 --mixed_precision bf16",
    "sd3.5-large": "--resolution 1024 --lora_rank 16 --min_rank 8 --mixed_precision bf16",
    "flux-dev": "--resolution 1024 --lora_rank 16 --min_rank 16 --mixed_precision bf16",
    "klein-4b": "--resolution 1024 --lora_rank 16 --min_rank 16 --mixed_precision bf16",
    "chroma1-hd": "--resolution 1024 --lora_rank 16 --min_rank 8 --mixed_precision bf16",
    "qwen-image": "--resolution 1328 --lora_rank 16 --min_rank 8 --mixed_precision bf16",
    "z-image-turbo": "--resolution 1024 --lora_rank 16 --min_rank 8 --mixed_precision bf16",
    "wan2.1-t2v-1.3b": "--resolution 480 --lora_rank 32 --min_rank 16 --mixed_precision bf16",
    "wan2.1-t2v-14b": "--resolution 720 --lora_rank 32 --min_rank 16 --mixed_precision bf16",
    "wan2.2-t2v-a14b": "--resolution 960 --lora_rank 32 --min_rank 16 --mixed_precision bf16",
}


def peak(name: str, flags: list[str]) -> float:
    from tlora.train.estimator import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--pretrained_model_name_or_path", name, *flags, "--json"]) == 0, name
    return json.loads(out.getvalue())["peak_gb"]


def run(argv: list[str] | None = None) -> int:
    from tlora.families.architectures import published

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(ROWS), default=None)
    opts = p.parse_args(argv)
    names = [opts.only] if opts.only else list(ROWS)
    missing = sorted(set(published()) - set(ROWS))
    if missing:
        print(f"note: no README row for {', '.join(missing)}")
    for name in names:
        flags = ROWS[name].split()
        print(f"{name:16s} {ROWS[name]:75s} {peak(name, flags):6.1f} GB  "
              f"{peak(name, flags + ['--gradient_checkpointing']):6.1f} GB checkpointed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
