"""Two CPU processes (torchrun, gloo) train one run: one folder, identical adapters, exact resume."""

import os
import subprocess
import sys

import pytest
import torch

from tlora.train.options import parse_args

from helpers import REPO, read_weights, train_args


def torchrun(argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "train.py"), *argv], capture_output=True, text=True, timeout=600,
                          env=env | {"OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_one_run_and_exact_resume(tiny_sdxl, image_dir, tmp_path):
    args = lambda out, steps, *extra: train_args(tiny_sdxl, image_dir, tmp_path / out,  # noqa: E731
                                                 "--num_train_epochs", steps, "--checkpointing_steps", "2", *extra)
    done = torchrun(args("a", "4"))
    runs = list((tmp_path / "a").iterdir())
    assert len(runs) == 1 and done.stdout.count("run folder:") == 1  # one run, reported once
    straight = runs[0]
    assert sorted(p.name for p in straight.iterdir()) == ["checkpoint-2", "checkpoint-4", "logs"]
    assert sorted(p.name for p in (straight / "checkpoint-4" / "resume").iterdir()) == [
        "manifest.json", "optimizer.bin", "progress.safetensors", "random_states_0.pkl", "random_states_1.pkl"]
    assert "Grad strides" not in done.stderr

    torchrun(args("b", "2"))
    torchrun(args("b", "4", "--resume_from_checkpoint", "latest"))
    resumed = next((tmp_path / "b").iterdir())
    a, b = read_weights(straight / "checkpoint-4")[0], read_weights(resumed / "checkpoint-4")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "logs" / "loss.csv").read_text() == (resumed / "logs" / "loss.csv").read_text()

    # Each process drew its own noise and timesteps: two processes differ from one process alone.
    from tlora.train.trainer import train

    single = train(parse_args(args("single", "4")))
    one = read_weights(single / "checkpoint-4")[0]
    assert any(not torch.equal(a[k], one[k]) for k in a if "lambda_layer" in k)


FAIL_ON_MAIN = """
import os, sys
sys.path.insert(0, {repo!r})
from tlora.train import checkpointing

if os.environ["RANK"] == "0":  # the main process's disk fills while it writes checkpoint-2's weights
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    checkpointing.save_weights = full
from tlora.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_checkpoint_failing_on_the_main_process_stops_every_process(tiny_sdxl, image_dir, tmp_path):
    """No process waits for ever: both end, the main one with the reason in one line."""
    script = tmp_path / "fail_on_main.py"
    script.write_text(FAIL_ON_MAIN.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           *train_args(tiny_sdxl, image_dir, tmp_path / "out", "--num_train_epochs", "4")],
                          capture_output=True, text=True, timeout=300, env=env | {"OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert done.returncode != 0
    assert "error: could not write checkpoint-2: the disk holding" in done.stderr
    assert "could not write checkpoint-2 (another process says why)" in done.stderr
