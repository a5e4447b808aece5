"""Nothing lost, nothing misread: divergence, overwrites, moved runs, damaged state, locks, late failures,
transparency, secrets. Each failure is one line naming what is wrong and the fix, and loses no finished work."""

import errno
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tlora.common.messages import Note
from tlora.interop import exporting
from tlora.runs.checkpoint_state import RESUME_DIR
from tlora.runs.run_folder import LOCK_NAME
from tlora.train.options import parse_args

import train
from conftest import one_line_error
from helpers import copy_run, make_image, read_weights, train_args


def finite(checkpoint) -> bool:
    return all(torch.isfinite(v).all() for v in read_weights(checkpoint)[0].values())


def runs(out):
    return sorted(p for p in out.iterdir() if p.is_dir())


@pytest.mark.slow
@pytest.mark.parametrize("limit", [[], ["--checkpoints_total_limit", "1"]], ids=["keep-all", "keep-one"])
def test_a_diverging_run_stops_and_keeps_its_newest_finite_checkpoint(tiny_sdxl, image_dir, tmp_path, capsys, limit):
    argv = train_args(tiny_sdxl, image_dir, tmp_path, "--learning_rate", "1e30", "--checkpointing_steps", "1",
                      "--num_train_epochs", "8", *limit)
    err = one_line_error(capsys, train.main(argv), "training diverged: the loss is nan at step 2; the newest finite "
                                                  "checkpoint is", exit_code=1)
    (run,) = runs(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "logs"]  # none after the divergence
    assert finite(run / "checkpoint-1") and str(run / "checkpoint-1") in err
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_non_finite_weights_are_never_written(tiny_sdxl, image_dir, tmp_path, capsys, monkeypatch):
    """Weights that stop being finite with a finite loss (no read-back) are caught before the checkpoint."""
    from tlora.train import trainer as training

    original = training.Trainer.step

    def step(self, indices):
        loss = original(self, indices)
        if self.progress.step == 2:  # the step being taken is 3
            with torch.no_grad():
                self.tlora.trainable_parameters()[0].fill_(float("inf"))
        return loss

    monkeypatch.setattr(training.Trainer, "step", step)
    argv = train_args(tiny_sdxl, image_dir, tmp_path, "--checkpointing_steps", "1", "--num_train_epochs", "5")
    one_line_error(capsys, train.main(argv), "the adapter weights are not finite after step 3", exit_code=1)
    (run,) = runs(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-2", "logs"]


@pytest.fixture(scope="module")
def state_run(trained_run):
    """A finished run with resume state in its two checkpoints (2 and 4); shared: the tests change copies."""
    return trained_run(num_train_epochs=4, resume_state_total_limit=2)


def resume_args(tiny_sdxl, image_dir, target, *extra):
    return train_args(tiny_sdxl, image_dir, target.parent if target.name.startswith("0") else target.parent.parent,
                      "--num_train_epochs", "6", "--resume_state_total_limit", "2", "--resume_from_checkpoint",
                      str(target), *extra)


@pytest.mark.slow
def test_damaged_resume_state_is_one_line_before_anything_loads(state_run, tiny_sdxl, image_dir, tmp_path, capsys):
    run = copy_run(state_run, tmp_path)
    optimizer = run / "checkpoint-4" / RESUME_DIR / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    for target in (run / "checkpoint-4", run):  # the checkpoint, or the run folder (its newest checkpoint)
        code = train.main(resume_args(tiny_sdxl, image_dir, target))
        err = one_line_error(capsys, code, f"--resume_from_checkpoint: {optimizer} is not the file checkpoint-4 saved")
        assert err.rstrip().endswith(f"move checkpoint-4 out of {run} to resume from checkpoint-2, or start a new run")
    one_line_error(capsys, train.main(resume_args(tiny_sdxl, image_dir, run / "checkpoint-2")),
                   "checkpoint-4 of {} is newer but cannot be resumed".format(run))
    (run / "checkpoint-4").rename(tmp_path / "set-aside")  # as the message says: resuming goes on from checkpoint-2
    assert parse_args(resume_args(tiny_sdxl, image_dir, run)).resume_checkpoint == run / "checkpoint-2"
    weights = run / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    one_line_error(capsys, train.main(resume_args(tiny_sdxl, image_dir, run)),
                   "is damaged (truncated or not a safetensors file")


@pytest.mark.slow
def test_a_moved_run_is_resumed_and_analysed_where_it_is(state_run, tiny_sdxl, image_dir, tmp_path, capsys):
    from tlora.evaluation.analysis import analyze
    from tlora.train.trainer import train as train_run

    before = sorted(state_run.rglob("*"))
    run = copy_run(state_run, tmp_path)
    with pytest.warns(Note, match=f"was written in {state_run}; resuming it where it is"):
        assert train_run(parse_args(resume_args(tiny_sdxl, image_dir, run))) == run
    assert (run / "checkpoint-6").is_dir() and yaml.safe_load((run / "logs/hparams.yml").read_text())["output_dir"] == str(run)
    with pytest.warns(Note, match="no samples_grid.png"):  # and it says which pictures it could not draw
        analyze(run)
    assert (run / "analysis" / "rank_schedule.png").is_file()
    assert sorted(state_run.rglob("*")) == before  # the original is untouched


@pytest.mark.slow
def test_one_run_is_trained_by_one_process_at_a_time(state_run, tiny_sdxl, image_dir, tmp_path, capsys):
    run = copy_run(state_run, tmp_path)
    (run / LOCK_NAME).write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live holder: this process
    one_line_error(capsys, train.main(resume_args(tiny_sdxl, image_dir, run)), "is being trained by process")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_NAME).write_text(f"{gone.stdout.strip()} {os.uname().nodename}\n")  # stale: that process is gone
    assert train.main(resume_args(tiny_sdxl, image_dir, run)) == 0
    assert (run / "checkpoint-6").is_dir() and not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint(tiny_sdxl, image_dir, tmp_path, capsys, monkeypatch):
    from tlora.train import checkpointing

    original = checkpointing.save_weights

    def full(state, folder, meta):
        if meta["global_step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state, folder, meta)

    monkeypatch.setattr(checkpointing, "save_weights", full)
    argv = train_args(tiny_sdxl, image_dir, tmp_path, "--num_train_epochs", "6")
    one_line_error(capsys, train.main(argv), "could not write checkpoint-4: the disk holding", exit_code=1)
    (run,) = runs(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "logs"]  # whole; no half-written leftovers
    assert (run / "checkpoint-2" / RESUME_DIR).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("fault, message, code", [
    (RuntimeError("W&B: project not found"), "--report_to wandb: the tracker did not start (W&B: project not found)",
     1),
    (KeyboardInterrupt(), "stopped at once before step 1 (SIGINT); nothing was kept", 130),
    ("SIGTERM", "stopped at once before step 1 (SIGTERM); nothing was kept", 143),
])
def test_failures_before_the_first_step_leave_nothing(tiny_sdxl, image_dir, tmp_path, capsys, monkeypatch, fault,
                                                     message, code):
    from tlora.train import trainer as training

    def broken(*args, **kwargs):
        if fault == "SIGTERM":  # a job scheduler's, while the model loads
            os.kill(os.getpid(), signal.SIGTERM)
        raise fault

    monkeypatch.setattr(training, "init_trackers", broken)
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--report_to", "wandb")
    one_line_error(capsys, train.main(argv), message, exit_code=code)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (("--project_name", "team/dogs"), "--project_name 'team/dogs': W&B takes 1 to 128 characters without"),
    (("--resume_from_checkpoint", "/no/such/run/checkpoint-4"), "/no/such/run/checkpoint-4 does not exist"),
])
def test_checked_up_front(tiny_sdxl, image_dir, tmp_path, capsys, extra, message):
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--report_to", "wandb", *extra)
    one_line_error(capsys, train.main(argv), message)


def test_a_config_key_given_twice_is_an_error(tiny_sdxl, image_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lora_rank: 4\nmin_rank: 2\nlora_rank: 8\n")
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--config", str(tmp_path / "c.yaml"))
    one_line_error(capsys, train.main(argv), "is not valid YAML at line 3 (the key 'lora_rank' is given twice)")


def test_a_file_given_as_a_folder_is_named_as_a_file(tiny_sdxl, image_dir, tmp_path, capsys):
    argv = train_args(tiny_sdxl, image_dir / "00.png", tmp_path / "out")
    one_line_error(capsys, train.main(argv), "is a file, not a folder; pass the folder that holds the images")


def test_latest_says_which_setting_differs(state_run, tiny_sdxl, image_dir, capsys):
    argv = train_args(tiny_sdxl, image_dir, state_run.parent, "--resume_from_checkpoint", "latest",
                      "--lora_rank", "8")
    with pytest.warns(Note, match=re.escape(f"no run to resume in {state_run.parent} with these settings "
                                            f"({state_run.name} has lora_rank = 4, not 8)")):
        assert parse_args(argv).resume_checkpoint is None


def test_transparent_pixels_are_white_or_the_loss_mask(tmp_path):
    from tlora.common.images import load_mask, load_pixels

    rgba = np.zeros((80, 96, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, hidden under transparency on the left half
    rgba[:, 48:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    pixels, _ = load_pixels(tmp_path / "cutout.png", 64)
    white, red = torch.ones(3, 64), torch.tensor([[1.0], [-1], [-1]]).expand(3, 64)
    assert torch.allclose(pixels[:, :, 0], white) and torch.allclose(pixels[:, :, -1], red)
    mask = load_mask(tmp_path / "cutout.png", 64, alpha=True)
    assert mask[:, 0].max() == 0 and mask[:, -1].min() == 1
    make_image(tmp_path / "opaque.png")
    assert load_mask(tmp_path / "opaque.png", 64, alpha=True).min() == 1  # no transparency: everything counts


@pytest.mark.slow
def test_alpha_mask_trains_and_excludes_mask_dir(tiny_sdxl, image_dir, tmp_path, capsys):
    from tlora.train.trainer import train as train_run

    run = train_run(parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "1",
                                          "--alpha_mask")))
    assert yaml.safe_load((run / "logs/hparams.yml").read_text())["alpha_mask"] is True
    capsys.readouterr()
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "b", "--alpha_mask", "--mask_dir", str(image_dir))
    one_line_error(capsys, train.main(argv), "--alpha_mask and --mask_dir both give loss masks; drop one of them")


def test_a_short_secret_never_corrupts_another_setting(tiny_sdxl, image_dir, tmp_path):
    """Removed by setting name and exact value: a model path or token that contains the key's letters is kept."""
    from tlora.runs.run_folder import public_hparams

    key = "sks"
    args = parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "sks_runs", "--wandb_api_key", key,
                                 "--placeholder_token", "sksdog", "--project_name", key))
    hp = public_hparams(args)
    assert hp["wandb_api_key"] is None and hp["project_name"] == "<redacted>"  # exactly the key
    assert hp["placeholder_token"] == "sksdog" and hp["output_dir"] == str(tmp_path / "sks_runs")
    i = hp["argv"].index("--wandb_api_key")
    assert hp["argv"][i + 1] == "<redacted>" and "sksdog" in hp["argv"] and str(tmp_path / "sks_runs") in hp["argv"]
    assert key not in yaml.safe_dump(hp).replace("sksdog", "").replace("sks_runs", "")


def test_export_never_overwrites_what_it_did_not_make(state_run, tmp_path, capsys):
    checkpoint = state_run / "checkpoint-4"
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"someone else's file")
    one_line_error(capsys, exporting.main([str(checkpoint), "--format", "kohya", "--out", str(out)]),
                   "exists; pass a new path, or --overwrite to replace it")
    assert out.read_bytes() == b"someone else's file"
    assert exporting.main([str(checkpoint), "--format", "kohya", "--out", str(out), "--overwrite"]) == 0
    weights = checkpoint / "pytorch_lora_weights.safetensors"
    data = weights.read_bytes()
    for target in (weights, checkpoint):
        fmt = "diffusers-scheduled" if target.is_dir() else "authors"
        one_line_error(capsys, exporting.main([str(checkpoint), "--format", fmt, "--out", str(target), "--overwrite"]),
                       "is (or holds) the checkpoint being exported; pass another path")
    assert weights.read_bytes() == data
