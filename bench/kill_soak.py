"""kill -9 at random moments, then check that every checkpoint is whole and that resume goes on.

    python bench/kill_soak.py [--kills 15] [--seed 1]

Trains the tiny model with a checkpoint every 3 steps and `--resume_from_checkpoint latest`, kills the
process with SIGKILL after a random 4.5-9 s (model loading takes about 4 s on a 2-core CPU), and after each
kill checks: every checkpoint-N has a readable weights file, every resume/ folder passes the resume checks (its
manifest, digests and plain-tensor files: runs.checkpoint_state.why_not_resumable), and loss.csv has each step once
(a last row cut short by the kill aside). Prints a line per kill; exits 1 on a fault.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import tlora  # noqa: F401  (first: quiets transformers' torchvision notice)
from tlora.families.tiny_models import BUILDERS
from tlora.runs.checkpoint_state import RESUME_DIR, why_not_resumable
from tlora.runs.reading import read
from tlora.runs.run_folder import RunFolder
from tlora.train.loss_log import read_loss_log

REPO = Path(__file__).resolve().parents[1]


def check(out: Path) -> tuple[list[int], int]:
    """(checkpoint steps, loss rows) after a kill; raises on anything partial."""
    steps, rows = [], 0
    for run in map(RunFolder, out.iterdir()):
        for step, checkpoint in run.checkpoints():
            read(checkpoint, quiet=True).tensors()  # raises on a missing or partial file
            if (checkpoint / RESUME_DIR).is_dir():
                problem = why_not_resumable(checkpoint)
                assert problem is None, problem
            steps.append(step)
        logged = [step for step, _ in read_loss_log(run.loss_log)]
        assert logged == list(range(1, len(logged) + 1)), "loss.csv has a gap or a repeated step"
        rows = len(logged) or rows
    return sorted(steps), rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--kills", type=int, default=15)
    p.add_argument("--seed", type=int, default=1)
    opts = p.parse_args()
    random.seed(opts.seed)
    scratch = Path(tempfile.mkdtemp(prefix="tlora-soak-"))
    model = BUILDERS["sdxl"](scratch / "tiny")
    (scratch / "data").mkdir()
    Image.fromarray((np.random.RandomState(0).rand(80, 96, 3) * 255).astype("uint8")).save(scratch / "data" / "00.png")
    out = scratch / "out"
    argv = [sys.executable, str(REPO / "train.py"), "--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora",
            "--pretrained_model_name_or_path", str(model), "--pretrained_vae_model_name_or_path", "none",
            "--train_data_dir", str(scratch / "data"), "--output_dir", str(out), "--class_name", "dog",
            "--placeholder_token", "sks", "--resolution", "64", "--num_train_epochs", "100000",
            "--checkpointing_steps", "3", "--lora_rank", "4", "--min_rank", "2", "--checkpoints_total_limit", "4",
            "--resume_from_checkpoint", "latest"]
    for kill in range(1, opts.kills + 1):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=os.environ | {"HF_HUB_OFFLINE": "1"})
        time.sleep(random.uniform(4.5, 9))
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            steps, rows = check(out)
        except Exception as err:  # report the fault, whatever its type
            print(f"kill {kill}: FAULT {type(err).__name__}: {err}")
            return 1
        runs = len(list(out.iterdir()))
        print(f"kill {kill}: {runs} run, checkpoints {steps}, loss rows {rows}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
