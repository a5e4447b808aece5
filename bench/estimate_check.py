"""The estimator against real steps on the CPU: peak live tensor bytes of one steady-state training step traced on
the meta device (CUDA's attention kernels modelled) and of the same step run for real (torch's CPU kernels),
side by side, for each configuration.

    python bench/estimate_check.py --model /tmp/sdxl-architecture --resolution 128     # a saved SDXL architecture
    python bench/estimate_check.py --model tiny --resolution 64

(`python bench/adapter_cost.py save --folder /tmp/sdxl-architecture` writes the SDXL architecture's folder.)
Half precision is compared on the meta side with CUDA autocast's op lists and on the real side with CPU autocast's,
which differ; fp32 compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tlora.families.pipelines import DTYPES, load_pipeline  # noqa: E402
from tlora.train.estimator import parse_args, trace_step  # noqa: E402

GB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="A model folder, or 'tiny' (built here).")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--min_rank", type=int, default=32)
    p.add_argument("--configs", default="no,no+checkpointing,bf16")
    opts = p.parse_args()
    model = opts.model
    if model == "tiny":
        from tlora.families.tiny_models import BUILDERS

        model = str(BUILDERS["sdxl"](Path(tempfile.mkdtemp()) / "tiny"))
    print("| configuration | traced on meta (GB) | real CPU step, tracked (GB) | ratio | activations meta / real (GB) |")
    print("|---|---|---|---|---|")
    rows = []
    for config in opts.configs.split(","):
        precision, _, extra = config.partition("+")
        flags = ["--pretrained_model_name_or_path", model, "--resolution", str(opts.resolution), "--lora_rank",
                 str(opts.rank), "--min_rank", str(opts.min_rank), "--trainer_type", "ortho_lora",
                 "--mixed_precision", precision] + (["--gradient_checkpointing"] if extra else [])
        args, _ = parse_args(flags)
        traced = trace_step(args, model)
        pipe = load_pipeline(model, "none", dtype=DTYPES[precision])
        real = trace_step(args, pipe=pipe)
        del pipe
        a, b = sum(traced["split"].values()), sum(real["split"].values())
        row = {"config": config, "meta_gb": a / GB, "real_gb": b / GB, "ratio": a / b,
               "activations_meta_gb": traced["split"]["activations"] / GB,
               "activations_real_gb": real["split"]["activations"] / GB}
        rows.append(row)
        print(f"| {config} | {a / GB:.3f} | {b / GB:.3f} | {a / b:.4f} | {row['activations_meta_gb']:.3f} / "
              f"{row['activations_real_gb']:.3f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
