"""Resume is bitwise exact; Ctrl-C / SIGTERM stop with a resumable checkpoint; disk stays bounded."""

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tlora.runs.checkpoint_state import RESUME_DIR
from tlora.train.options import parse_args

import train as train_py
from helpers import read_weights, train_args


def run(tiny_sdxl, data, out, *extra):
    from tlora.train.trainer import train

    return train(parse_args(train_args(tiny_sdxl, data, out, *extra)))


def same_checkpoint(a: Path, b: Path) -> None:
    wa, wb = read_weights(a)[0], read_weights(b)[0]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("trainer_type, prior", [("ortho_lora", False), ("lora", False), ("ortho_lora", True),
                                                 ("lora", True)])
def test_ten_plus_ten_steps_equal_twenty(tiny_sdxl, image_dir, class_dir, tmp_path, trainer_type, prior):
    extra = ["--trainer_type", trainer_type, "--checkpointing_steps", "10", "--learning_rate", "1e-3"]
    if prior:  # 3 class images, batch 1: the resume falls in the middle of a pass over the data
        extra += ["--with_prior_preservation", "--class_data_dir", str(class_dir)]
    straight = run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "20", *extra)
    first = run(tiny_sdxl, image_dir, tmp_path / "b", "--num_train_epochs", "10", *extra)
    assert (first / "checkpoint-10" / RESUME_DIR / "optimizer.bin").is_file()
    resumed = run(tiny_sdxl, image_dir, tmp_path / "b", "--num_train_epochs", "20",
                  "--resume_from_checkpoint", "latest", *extra)
    assert resumed == first  # the same run folder
    same_checkpoint(straight / "checkpoint-20", resumed / "checkpoint-20")
    same_checkpoint(straight / "checkpoint-10", resumed / "checkpoint-10")
    assert (straight / "logs" / "loss.csv").read_text() == (resumed / "logs" / "loss.csv").read_text()
    assert len((resumed / "logs" / "loss.csv").read_text().splitlines()) == 21
    hp = yaml.safe_load((resumed / "logs" / "hparams.yml").read_text())
    assert hp["num_train_epochs"] == 20 and [r["from_step"] for r in hp["resumed"]] == [10]
    # only the newest checkpoint keeps the resume state
    assert not (resumed / "checkpoint-10" / RESUME_DIR).exists() and (resumed / "checkpoint-20" / RESUME_DIR).is_dir()


def interrupt_at(monkeypatch, at_step: int, signals: list[int]) -> None:
    """Deliver `signals` to this process right after optimizer step `at_step`."""
    from tlora.train import trainer as training

    original, done = training.Trainer.step, []

    def step(self, indices):
        loss = original(self, indices)
        done.append(1)
        if len(done) == at_step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(training.Trainer, "step", step)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_with_a_resumable_checkpoint(
    tiny_sdxl, image_dir, tmp_path, monkeypatch, capsys, signum, code
):
    interrupt_at(monkeypatch, 3, [signum])
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--num_train_epochs", "50", "--checkpointing_steps", "20",
                      "--validation_prompts", "a {0}")
    assert train_py.main(argv) == code
    runs = list((tmp_path / "out").iterdir())
    checkpoint = runs[0] / "checkpoint-3"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted at step 3; resume with --resume_from_checkpoint {checkpoint}"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file() and (checkpoint / RESUME_DIR).is_dir()
    assert not (checkpoint / "samples").exists()  # no validation on the way out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    if signum == signal.SIGINT:  # and the interrupted run goes on exactly
        monkeypatch.undo()
        resumed = run(tiny_sdxl, image_dir, tmp_path / "out", "--num_train_epochs", "6", "--checkpointing_steps", "20",
                      "--validation_prompts", "a {0}", "--resume_from_checkpoint", str(checkpoint))
        straight = run(tiny_sdxl, image_dir, tmp_path / "straight", "--num_train_epochs", "6",
                       "--checkpointing_steps", "20", "--validation_prompts", "a {0}")
        same_checkpoint(straight / "checkpoint-6", resumed / "checkpoint-6")
        assert (straight / "logs" / "loss.csv").read_text() == (resumed / "logs" / "loss.csv").read_text()


@pytest.mark.slow
def test_second_signal_stops_at_once(tiny_sdxl, image_dir, tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--num_train_epochs", "50", "--checkpointing_steps", "1")
    assert train_py.main(argv) == 130
    assert "stopped at once" in capsys.readouterr().err
    run_folder = next((tmp_path / "out").iterdir())
    assert sorted(p.name for p in run_folder.glob("checkpoint-*")) == ["checkpoint-1"]  # step 2 never saved


@pytest.mark.slow
def test_checkpoint_and_resume_state_limits(tiny_sdxl, image_dir, tmp_path):
    folder = run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "6", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "3", "--resume_state_total_limit", "2")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-5", "checkpoint-6", "logs"]
    assert [(folder / f"checkpoint-{n}" / RESUME_DIR).is_dir() for n in (4, 5, 6)] == [False, True, True]
    assert not list(folder.rglob(".*"))  # no temporary or half-removed folder left


@pytest.mark.slow
def test_incomplete_checkpoint_is_skipped(tiny_sdxl, image_dir, tmp_path, monkeypatch):
    """A crash while writing checkpoint-4 leaves no checkpoint-4 (only its hidden staging folder, as kill -9
    would leave it); resume goes on from checkpoint-2 and sweeps the leftover."""
    from tlora.runs import checkpoint_state

    folder = run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "2", "--checkpointing_steps", "2")
    original = checkpoint_state.Progress.save

    class Killed(BaseException):  # as kill -9: nothing runs after it
        pass

    def crash(self, folder):
        if self.step == 4:
            raise Killed
        return original(self, folder)

    monkeypatch.setattr(checkpoint_state.Progress, "save", crash)
    with pytest.raises(Killed):
        run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "4", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", "latest")
    assert not (folder / "checkpoint-4").exists() and (folder / ".checkpoint-4.tmp").is_dir()
    assert (folder / "checkpoint-2" / RESUME_DIR).is_dir()
    monkeypatch.undo()
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "4", "--checkpointing_steps", "2",
                      "--resume_from_checkpoint", "latest")
    assert parse_args(argv).resume_checkpoint == folder / "checkpoint-2"
    run(tiny_sdxl, image_dir, tmp_path / "a", *argv[argv.index("--num_train_epochs"):])
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4", "logs"]


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (("--lora_rank", "8"), "was trained with lora_rank = 4, not 8"),
    (("--trainer_type", "lora"), "was trained with trainer_type = 'ortho_lora', not 'lora'"),
    (("--resolution", "128"), "was trained with resolution = 64, not 128"),
    (("--one_image", "01.jpg"), "was trained with data_sha256"),
])
def test_resume_with_other_settings_is_refused(trained_run, tiny_sdxl, image_dir, capsys, change, message):
    folder = trained_run(num_train_epochs=1, lora_rank=4)  # shared, only read: each resume is refused up front
    argv = train_args(tiny_sdxl, image_dir, folder.parent, "--resume_from_checkpoint", str(folder), *change)
    capsys.readouterr()
    assert train_py.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_resume_keeps_the_wandb_run(tiny_sdxl, image_dir, tmp_path):
    folder = run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "1", "--report_to", "wandb")
    (first,) = (folder / "logs" / "wandb").glob("offline-run-*")
    first.rename(first.with_name("first-" + first.name))  # W&B names its folders by the second: both runs may share one
    run(tiny_sdxl, image_dir, tmp_path / "a", "--num_train_epochs", "2", "--report_to", "wandb",
        "--resume_from_checkpoint", "latest")
    run_id = yaml.safe_load((folder / "logs" / "hparams.yml").read_text())["wandb_run_id"]
    offline = sorted((folder / "logs" / "wandb").glob("*offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
