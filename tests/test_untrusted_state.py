"""A checkpoint or run folder may come from anyone: nothing in it runs code, its files must prove they belong
together, and a finished checkpoint is never replaced. Every refusal is one line, before any model loads."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tlora.runs.checkpoint_state import MANIFEST_NAME, PROGRESS_NAME, RESUME_DIR, sha256
from tlora.runs.weights import WEIGHTS_NAME

import train
from conftest import one_line_error
from helpers import copy_run, train_args

FILES = (WEIGHTS_NAME, f"{RESUME_DIR}/optimizer.bin", f"{RESUME_DIR}/random_states_0.pkl",
         f"{RESUME_DIR}/{PROGRESS_NAME}", f"{RESUME_DIR}/{MANIFEST_NAME}")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(trained_run):
    """A run of 4 steps with resume state in checkpoint-2 and checkpoint-4 (shared: the tests change copies)."""
    return trained_run(num_train_epochs=4, resume_state_total_limit=2)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal here comes before."""
    from tlora.train import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "load_pipeline", refuse)


def tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def resume(tiny_sdxl, image_dir, target: Path, *extra: str) -> list[str]:
    return train_args(tiny_sdxl, image_dir, target.parent.parent, "--num_train_epochs", "6",
                      "--resume_state_total_limit", "2", "--resume_from_checkpoint", str(target), *extra)


def forge_manifest(checkpoint: Path) -> None:
    """Rewrite the manifest to the files now there, as someone who wanted a planted file to pass would."""
    path = checkpoint / RESUME_DIR / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    state = checkpoint / RESUME_DIR
    manifest["files"] = {p.name: sha256(p) for p in state.iterdir() if p.name != MANIFEST_NAME}
    manifest["weights"]["sha256"] = sha256(checkpoint / WEIGHTS_NAME)
    path.write_text(json.dumps(manifest))


NOT_TENSORS = "is not a torch file of tensors and plain values (damaged, or a pickle that could run code"
PLANTED = {  # file, manifest rewritten to match -> what the refusal says
    (WEIGHTS_NAME, False): "is damaged (truncated or not a safetensors file",
    (WEIGHTS_NAME, True): "is damaged (truncated or not a safetensors file",
    (f"{RESUME_DIR}/optimizer.bin", False): "is not the file checkpoint-4 saved",
    (f"{RESUME_DIR}/optimizer.bin", True): NOT_TENSORS,
    (f"{RESUME_DIR}/random_states_0.pkl", False): "is not the file checkpoint-4 saved",
    (f"{RESUME_DIR}/random_states_0.pkl", True): NOT_TENSORS,
    (f"{RESUME_DIR}/{PROGRESS_NAME}", False): "is not the file checkpoint-4 saved",
    (f"{RESUME_DIR}/{PROGRESS_NAME}", True): "is not a progress file of tlora's",
    (f"{RESUME_DIR}/{MANIFEST_NAME}", False): "is not a manifest of tlora's resume state",
    (f"{RESUME_DIR}/custom_checkpoint_0.pkl", False): "is not one of the checkpoint's files",
    (f"{RESUME_DIR}/custom_checkpoint_0.pkl", True): NOT_TENSORS,
}


def test_the_payload_runs_when_unpickled_plainly(tmp_path):
    """The control: what the tests below plant does run code when loaded as a plain pickle."""
    torch.save({"state": Payload(tmp_path / "ran")}, tmp_path / "payload.bin")
    torch.load(tmp_path / "payload.bin", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("name, forged", list(PLANTED))
def test_a_planted_pickle_never_runs(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model, name, forged):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"state": Payload(marker), "param_groups": []}, run / "checkpoint-4" / name)
    if forged:
        forge_manifest(run / "checkpoint-4")
    code = train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4"))
    err = one_line_error(capsys, code, PLANTED[name, forged])
    assert str(run / "checkpoint-4" / name) in err and not marker.exists()


def test_code_in_hparams_yml_never_runs(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "ran"
    hparams = run / "logs" / "hparams.yml"
    hparams.write_text(hparams.read_text() + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")), str(hparams))
    assert not marker.exists()


@pytest.mark.parametrize("name", [*FILES, RESUME_DIR])
def test_files_of_two_checkpoints_never_mix(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model, name):
    """Each file (and the whole resume folder) swapped between checkpoint-2 and checkpoint-4: refused, naming it."""
    run = copy_run(finished_run, tmp_path)
    a, b, spare = run / "checkpoint-2" / name, run / "checkpoint-4" / name, tmp_path / "spare"
    a.rename(spare)
    b.rename(a)
    spare.rename(b)
    before = tree(run)
    for target in (run / "checkpoint-4", run):
        err = one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, target)), "--resume_from_checkpoint: ")
        assert str(b if name != RESUME_DIR else b / MANIFEST_NAME) in err, err
    assert tree(run) == before  # nothing written, no finished checkpoint changed


@pytest.mark.parametrize("tensors, metadata, message", [
    (None, {"step": "99", "taken": "[1]"}, "is of step 99, not 4"),
    (None, {"step": "4", "taken": "[1000]"}, "counts more batches than a pass over the data has (2)"),
    (None, {"step": "4", "taken": "[true]"}, "is not a progress file of tlora's"),
    (None, {"step": "4", "taken": "[[[[[[1]]]]]]"}, "is not a progress file of tlora's"),
    (None, {"step": "-4", "taken": "[1]"}, "is not a progress file of tlora's"),
    ({"generator.0": torch.zeros(10, dtype=torch.uint8)}, {"step": "4", "taken": "[1]"},
     "is not a progress file of tlora's"),
])
def test_a_forged_progress_is_refused(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model, tensors,
                                      metadata, message):
    """Rewritten with its manifest to match: still refused, before any model loads, as nothing could resume it."""
    from safetensors.torch import load_file, save_file

    run = copy_run(finished_run, tmp_path)
    path = run / "checkpoint-4" / RESUME_DIR / PROGRESS_NAME
    save_file(tensors or load_file(str(path)), str(path), metadata=metadata)
    forge_manifest(run / "checkpoint-4")
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")), f"{path} {message}")


@pytest.mark.parametrize("change", ["torch_manual_seed", "numpy_random_seed", "random_state"])
def test_forged_rng_states_are_refused(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model, change):
    """accelerate skips RNG states it cannot set without a word (an inexact resume): checked before loading."""
    from accelerate.utils import load

    run = copy_run(finished_run, tmp_path)
    path = run / "checkpoint-4" / RESUME_DIR / "random_states_0.pkl"
    states = load(path, weights_only=True)
    states[change] = torch.zeros(10, dtype=torch.uint8) if change == "torch_manual_seed" else (1, 2)
    torch.save(states, path)
    forge_manifest(run / "checkpoint-4")
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")),
                   f"{path} does not hold the RNG states accelerate saves")


@pytest.mark.slow
def test_a_loss_log_cut_short_resumes(finished_run, tiny_sdxl, image_dir, tmp_path):
    """A row torn by a full disk at the end of loss.csv is left out; the resumed log is whole."""
    run = copy_run(finished_run, tmp_path)
    loss = run / "logs" / "loss.csv"
    loss.write_text(loss.read_text() + "5,0.3")
    assert train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")) == 0
    rows = loss.read_text().splitlines()
    assert rows[0] == "step,loss" and [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]


def test_an_older_checkpoint_is_never_resumed_over_a_newer_one(finished_run, tiny_sdxl, image_dir, tmp_path, capsys,
                                                               no_model):
    """Resuming checkpoint-2 would write checkpoint-4 again: refused, whether checkpoint-4 can be resumed or not."""
    run = copy_run(finished_run, tmp_path)
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-2")),
                   f"checkpoint-4 of {run} is newer; resume from it")
    shutil.rmtree(run / "checkpoint-4" / RESUME_DIR)
    err = one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run)),
                         f"{run / 'checkpoint-4'} has no resume state")
    assert f"move checkpoint-4 out of {run} to resume from checkpoint-2" in err
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-2")),
                   "resuming checkpoint-2 would write checkpoint-4 again: move checkpoint-4 out of the run folder")


@pytest.mark.slow
def test_a_checkpoint_that_appears_while_training_is_kept(finished_run, tiny_sdxl, image_dir, tmp_path, capsys,
                                                          monkeypatch):
    from tlora.train import checkpointing

    run = copy_run(finished_run, tmp_path)
    original = checkpointing.Checkpointer.save

    def save(self, step):
        if step == 6:
            (run / "checkpoint-6").mkdir()
            (run / "checkpoint-6" / "mine.txt").write_text("someone's")
        return original(self, step)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save)
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")),
                   "checkpoint-6 appeared in", exit_code=1)
    assert [p.name for p in (run / "checkpoint-6").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("change, message", [
    (lambda c: (c / RESUME_DIR / MANIFEST_NAME).unlink(),
     "manifest.json is missing (resume state written by an older tlora or another tool)"),
    (lambda c: (c / RESUME_DIR / MANIFEST_NAME).write_bytes(b"\xff\xfe not json"), "is not a manifest of tlora's"),
    (lambda c: (c / RESUME_DIR / MANIFEST_NAME).write_text("[1, 2]"), "is not a manifest of tlora's"),
    (lambda c: (c / RESUME_DIR / MANIFEST_NAME).write_text("[" * 100000), "is not a manifest of tlora's"),
    (lambda c: (c.parent / "logs" / "loss.csv").write_text("step,loss\n1,0.5\ntwo,x\n3,0.4\n"), "is not a loss log"),
    (lambda c: (c.parent / "logs" / "loss.csv").write_bytes(b"step,loss\n1,\xff\n"), "is not UTF-8 text"),
])
def test_damaged_run_files_are_one_line(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, no_model, change,
                                        message):
    run = copy_run(finished_run, tmp_path)
    change(run / "checkpoint-4")
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")), message)


def test_resume_with_another_process_count_is_refused(finished_run, tiny_sdxl, image_dir, tmp_path, capsys,
                                                      monkeypatch, no_model):
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = copy_run(finished_run, tmp_path)
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")),
                   "was trained with 1 processes, not 2; resume with 1 processes")


def test_a_run_folder_that_cannot_be_written(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, monkeypatch,
                                            no_model):
    """A read-only run folder (or disk): one line naming the folder, as the system tells it (as root, permissions
    are not enforced, so the system's answer is stood in for)."""
    from tlora.train import resume as resume_module

    run = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(resume_module.os, "access", lambda path, mode: Path(path) != run)
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")),
                   f"--resume_from_checkpoint: cannot write in {run}; make it writable")


def test_a_lock_that_cannot_be_made_is_one_line(finished_run, tiny_sdxl, image_dir, tmp_path, capsys, monkeypatch):
    """The folder turned read-only between the checks and the lock: one line, nothing raised at exit."""
    from tlora.runs import run_folder

    run = copy_run(finished_run, tmp_path)

    def read_only(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(run_folder.os, "open", read_only)
    one_line_error(capsys, train.main(resume(tiny_sdxl, image_dir, run / "checkpoint-4")),
                   f"--resume_from_checkpoint: cannot write in {run} (Permission denied); make it writable")


def test_the_resume_state_is_plain_data(finished_run):
    """What a checkpoint holds: safetensors, JSON, and accelerate's torch files that load with weights_only."""
    from accelerate.utils import load

    state = finished_run / "checkpoint-4" / RESUME_DIR
    assert sorted(p.name for p in state.iterdir()) == sorted([MANIFEST_NAME, PROGRESS_NAME, "optimizer.bin",
                                                              "random_states_0.pkl"])
    manifest = json.loads((state / MANIFEST_NAME).read_text())
    weights = finished_run / "checkpoint-4" / WEIGHTS_NAME
    assert manifest["step"] == 4 and manifest["weights"]["sha256"] == sha256(weights)
    assert manifest["files"] == {p.name: sha256(p) for p in state.iterdir() if p.name != MANIFEST_NAME}
    for name in ("optimizer.bin", "random_states_0.pkl"):
        assert isinstance(load(state / name, weights_only=True), dict)
    assert yaml.safe_load((finished_run / "logs" / "hparams.yml").read_text())["num_train_epochs"] == 4
