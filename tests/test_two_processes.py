"""Two CPU processes (torchrun, gloo) train one run: one folder, identical adapters, exact resume."""

import os
import subprocess
import sys
from pathlib import Path

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


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.slow
def test_no_host_sync_in_any_step_with_two_processes(tiny_sdxl, image_dir, tmp_path, monkeypatch):
    """With two processes (their collectives faked in one) no step reads a tensor back to the host: the step itself
    never, and the loop only at the steps where the losses are read and a stop is agreed (every LOSS_FLUSH_STEPS-th
    and the last). Counted by the Tensor methods that sync a device (.item(), .tolist(), .cpu(), bool(), ...)."""
    from accelerate import Accelerator

    from tlora.train.loss_log import LOSS_FLUSH_STEPS
    from tlora.train.trainer import Trainer

    steps = LOSS_FLUSH_STEPS + 2
    trainer = Trainer(parse_args(train_args(tiny_sdxl, image_dir, tmp_path, "--num_train_epochs", str(steps),
                                            "--checkpointing_steps", "1000")))
    trainer.setup()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(Accelerator, "gather", lambda self, t: torch.cat([t, t]))
    where = {"step": 0, "inside": False}
    syncs = []
    for name in SYNCING:
        def counted(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            caller = sys._getframe(1).f_code
            syncs.append((where["step"], where["inside"], _name, f"{Path(caller.co_filename).stem}.{caller.co_name}"))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def step(self, indices, _step=Trainer.step):
        where.update(step=where["step"] + 1, inside=True)
        try:
            return _step(self, indices)
        finally:
            where["inside"] = False
    monkeypatch.setattr(Trainer, "step", step)
    trainer.train()
    monkeypatch.undo()
    host_only = {("tolist", "conditioning._stack"),  # the sampler's indices, host data
                 ("__int__", "injection.set_timestep")}  # the mask cut at its largest rank: on the CPU only
    assert where["step"] == steps and {s[2:] for s in syncs if s[1]} == host_only, syncs  # no other in a step
    host_data = ("sampler.__iter__", "dataloader.__init__")  # each pass's order and its seed: host data
    outside = [s for s in syncs if not s[1] and s[3] not in host_data]
    assert {s[0] for s in outside} == {LOSS_FLUSH_STEPS, steps}, outside  # the loop: only at the due steps
    assert len(trainer.losses) == steps
