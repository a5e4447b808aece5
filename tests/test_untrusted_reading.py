"""Trust nothing on disk: every run, checkpoint, record and file a command reads is checked, a bad one is one line
naming it (before any model loads), and a command never reads or writes another run than the one it was given."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import tlora
from tlora.common.errors import CheckpointError, UsageError
from tlora.common.messages import Note
from tlora.evaluation import analysis
from tlora.generate import generation
from tlora.interop import exporting
from tlora.runs.weights import WEIGHTS_NAME

import inference
from conftest import assert_helpful, one_line_error
from helpers import copy_run, opened, read_weights, under, with_flags


def snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# -- a trained run and copies of it -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(trained_run):
    """A tiny trained run with checkpoint-2 and checkpoint-4 (shared: the tests change copies of it)."""
    return trained_run(num_train_epochs=4, resume_state_total_limit=2)


def infer_argv(run: Path, *extra: str) -> list[str]:
    return with_flags(["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "4",
                       "--prompts", "a {0}", "--num_images_per_prompt", "1", "--num_inference_steps", "1"], extra)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be refused before."""
    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tlora.generate.inference.load_pipeline", load_pipeline)


def weights_of(run: Path, step: int = 4) -> Path:
    return run / f"checkpoint-{step}" / WEIGHTS_NAME


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- 1. never another run -------------------------------------------------------------------------------------
def _no_checkpoint(copy):
    shutil.rmtree(copy / "checkpoint-4")


def _weights_a_folder(copy):
    weights_of(copy).unlink()
    weights_of(copy).mkdir()


def _weights_a_pipe(copy):  # opening it would wait forever
    weights_of(copy).unlink()
    os.mkfifo(weights_of(copy))


def _no_checkpoints_at_all(copy):
    for folder in copy.glob("checkpoint-*"):
        shutil.rmtree(folder)


BROKEN = {
    "checkpoint missing": (_no_checkpoint, "--checkpoint_idx 4: no T-LoRA weights"),
    "weights a folder": (_weights_a_folder, "pytorch_lora_weights.safetensors is a folder, not a weights file"),
    "weights a pipe": (_weights_a_pipe, "is not a regular file (a device, pipe or socket)"),
    "weights truncated": (lambda copy: truncate(weights_of(copy)), "is damaged (truncated or not a safetensors file"),
    "no checkpoints at all": (_no_checkpoints_at_all, "pass the N of one of the run's checkpoint-N folders (it has "
                                                      "none)"),
}


def test_the_trace_sees_weights_read_by_safetensors(run):
    """The control: a weights file read through safetensors (no audit event of its own) is recorded."""
    with opened() as paths:
        tlora.read(run / "checkpoint-4", quiet=True).tensors()
    assert str(run / "checkpoint-4" / WEIGHTS_NAME) in paths


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_copy_never_reads_or_writes_the_original(run, tmp_path, capsys, no_model, case):
    breaks, message = BROKEN[case]
    copy = copy_run(run, tmp_path)
    breaks(copy)
    before = snapshot(run)
    with opened() as paths:
        code = inference.main(infer_argv(copy))
    err = one_line_error(capsys, code, message)
    assert str(copy) in err and str(run) + "/" not in err
    assert under(paths, run) == [] and snapshot(run) == before
    assert under(paths, copy)  # it did read the copy


def test_the_run_folder_itself_must_hold_weights_without_checkpoint_idx(run, tmp_path, capsys, no_model):
    copy = copy_run(run, tmp_path)
    argv = ["--config_path", str(copy / "logs" / "hparams.yml"), "--prompts", "a {0}"]
    with opened() as paths:
        code = inference.main(argv)
    one_line_error(capsys, code, "--checkpoint_idx is not given and no T-LoRA weights (pytorch_lora_weights."
                                 f"safetensors or lora.pt) are in {copy}; pass the N of one of the run's checkpoint-N "
                                 "folders (2, 4)")
    assert under(paths, run) == []


def test_a_loose_hparams_reads_the_run_it_records_and_says_so(run, tmp_path, capsys, no_model):
    loose = tmp_path / "hparams.yml"
    shutil.copy(run / "logs" / "hparams.yml", loose)
    argv = with_flags(infer_argv(run), ("--config_path", str(loose), "--guidance_scale", "nan"))
    assert inference.main(argv) == 2
    note, error = capsys.readouterr().err.splitlines()
    assert note == (f"note: {loose} is not in a run's logs/ folder: reading the run its output_dir records, {run}, "
                    "and writing samples there")
    assert error.startswith("error: --guidance_scale must be a finite number")
    (tmp_path / "elsewhere.yml").write_text(yaml.safe_dump({"output_dir": str(tmp_path / "gone")}))
    one_line_error(capsys, inference.main(with_flags(argv, ("--config_path", str(tmp_path / "elsewhere.yml")))),
                   "is not in a run's logs/ folder and the output_dir it records")


@pytest.mark.slow
# -- 2. an older checkpoint only with a note; a named one never replaced -------------------------------------------
def test_a_broken_newest_checkpoint_is_passed_over_with_a_note(run, tmp_path, capsys):
    copy = copy_run(run, tmp_path)
    truncate(weights_of(copy))
    with pytest.warns(Note, match=r"using checkpoint-2, the newest usable checkpoint; passed over checkpoint-4: .*is "
                                  r"damaged"):
        ckpt = tlora.read(copy)
    assert ckpt.path == weights_of(copy, 2)
    with pytest.raises(CheckpointError, match="is damaged") as refused:
        tlora.read(copy / "checkpoint-4")  # named: refused, never replaced
    assert_helpful(str(refused.value))

    assert analysis.main([str(copy)]) == 0
    err = capsys.readouterr().err
    assert f"note: {copy}: using checkpoint-2, the newest usable checkpoint; passed over checkpoint-4" in err
    assert (copy / "analysis" / "effective_rank.png").is_file()
    out = tmp_path / "k.safetensors"
    assert exporting.main([str(copy), "--format", "kohya", "--out", str(out)]) == 0
    assert "passed over checkpoint-4" in capsys.readouterr().err and out.is_file()
    one_line_error(capsys, exporting.main([str(copy / "checkpoint-4"), "--format", "kohya", "--out", str(tmp_path / "n")]),
                   f"{weights_of(copy)} is damaged")

    weights_of(copy, 2).unlink()
    weights_of(copy, 2).mkdir()
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {copy}: the newest, checkpoint-4: "):
        tlora.read(copy)
    one_line_error(capsys, analysis.main([str(copy)]), "no usable checkpoint in")


# -- 3. distinct prompt folders for distinct prompts --------------------------------------------------------------
class FakePipe:
    """Stands in for a pipeline: one small image per call, its colour from the prompt text."""

    device = torch.device("cpu")

    def __call__(self, prompt, generator, num_images_per_prompt, **kwargs):
        colour = sum(map(ord, prompt)) % 256
        return type("Out", (), {"images": [Image.new("RGB", (8, 8), (colour, 0, 0))] * num_images_per_prompt})


def sample(folder: Path, *templates: str) -> dict:
    cfg = generation.Sampling("sks", "dog", folder, num_images_per_prompt=2)
    generation.run(FakePipe(), list(templates), cfg)
    return yaml.safe_load((folder / "prompts.yaml").read_text())


def digest(template: str) -> str:
    import hashlib

    return hashlib.sha256(template.encode()).hexdigest()[:8]


def test_two_templates_never_share_a_prompt_folder(tmp_path):
    record = sample(tmp_path / "v0", "a {0}", "a sks", "a/{0}", "a_{0}", "A {0}")
    assert {name: entry["prompt"] for name, entry in record.items()} == {
        "a sks": "a {0}", f"a sks-{digest('a sks')}": "a sks",  # the same name as the authors': the first keeps it
        f"a_sks-{digest('a/{0}')}": "a/{0}", "a_sks": "a_{0}",  # cleaned: the hash of the exact template
        f"A sks-{digest('A {0}')}": "A {0}",  # one folder to a file system that ignores case
    }
    assert all(len(list((tmp_path / "v0" / name).glob("[0-9].png"))) == 2 for name in record)
    assert record["a sks"]["text"] == "a sks dog" and record[f"a sks-{digest('a sks')}"]["text"] == "a sks"


def test_a_folder_recorded_for_another_prompt_is_never_done(tmp_path):
    folder = tmp_path / "v0"
    sample(folder, "a sks")
    before = snapshot(folder / "a sks")
    record = sample(folder, "a {0}")  # a later call: "a sks" is taken by the template "a sks"
    assert record["a sks"]["prompt"] == "a sks" and record[f"a sks-{digest('a {0}')}"]["prompt"] == "a {0}"
    assert snapshot(folder / "a sks") == before and len(list((folder / f"a sks-{digest('a {0}')}").glob("*.png"))) == 3
    again = sample(folder, "a {0}", "a sks")  # both done now: nothing generated, nothing renamed
    assert again == record and snapshot(folder / "a sks") == before


def test_prompts_yaml_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "prompts.yaml").write_bytes(b"a sks: {prompt: \xff}\n")
    with pytest.raises(UsageError, match="prompts.yaml is not UTF-8 text; delete or fix it") as refused:
        sample(tmp_path, "a {0}")
    assert_helpful(str(refused.value))


# -- 4. weights checked when read: before any model loads -----------------------------------------------------------
def rewrite(run: Path, copy: Path, change) -> Path:
    """The copy's checkpoint-4: the run's tensors changed by `change` (its metadata kept)."""
    tensors, metadata = read_weights(run / "checkpoint-4")
    change(tensors)
    save_file(tensors, str(weights_of(copy)), metadata=metadata)
    return weights_of(copy)


def first_key(tensors: dict, end: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(end))


def _integers(tensors):
    key = first_key(tensors, "lambda_layer")
    tensors[key] = tensors[key].long()


def _nan(tensors):
    key = first_key(tensors, "p_layer.weight")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def test_weights_that_are_not_floats_or_not_finite_are_refused_before_the_model(run, tmp_path, capsys, no_model):
    copy = copy_run(run, tmp_path)
    weights = rewrite(run, copy, _integers)
    one_line_error(capsys, inference.main(infer_argv(copy)), f"{weights}: tensor ")
    one_line_error(capsys, exporting.main([str(weights), "--format", "kohya", "--out", str(tmp_path / "k")]),
                   "is I64, not floating point, so this is not a T-LoRA checkpoint")
    rewrite(run, copy, _nan)
    one_line_error(capsys, inference.main(infer_argv(copy)), "holds NaN or inf values (a diverged run?); use an older")
    one_line_error(capsys, exporting.main([str(weights), "--format", "authors", "--out", str(tmp_path / WEIGHTS_NAME)]),
                   f"{weights}: tensor ")
    assert not (tmp_path / WEIGHTS_NAME).exists()


def test_a_checkpoint_for_another_model_is_one_line_from_tlora_load(run, tmp_path, sdxl_pipe):
    copy = copy_run(run, tmp_path)

    def wider(tensors):
        key = first_key(tensors, "q_layer.weight")
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)

    def missing(tensors):
        del tensors[first_key(tensors, "lambda_layer")]

    for change, said in ((wider, "has shape"), (missing, "has no tensor")):
        weights = rewrite(run, copy, change)
        with pytest.raises(CheckpointError, match=f"{weights} does not fit this sdxl model .*{said}") as refused:
            tlora.load(sdxl_pipe, copy / "checkpoint-4")
        assert_helpful(str(refused.value))
        assert "it was trained on another model: load the base model its run names" in str(refused.value)
        assert tlora.attached(sdxl_pipe.unet) is None


# -- 5. tlora.load takes settings only; tlora.scheduled whole step counts ----------------------------------------------
@pytest.mark.parametrize("keyword, said", [
    ({"family": "flux"}, "family='flux' is not a setting here: the family is the model's"),
    ({"quiet": True}, "quiet= is not a T-LoRA setting"),
    ({"fix": "x"}, "fix= is not a T-LoRA setting"),
    ({"num_train_timesteps": 10}, "num_train_timesteps= is not a T-LoRA setting"),
])
def test_tlora_load_refuses_what_is_not_a_setting(run, sdxl_pipe, keyword, said):
    with pytest.raises(UsageError, match=said) as refused:
        tlora.load(sdxl_pipe, run, **keyword)
    assert_helpful(str(refused.value))
    assert tlora.attached(sdxl_pipe.unet) is None


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "25"])
def test_tlora_scheduled_refuses_a_step_count_that_is_not_one(sdxl_pipe, tmp_path, steps):
    with pytest.raises(UsageError, match="num_inference_steps must be a whole number of at least 1") as refused:
        tlora.scheduled(sdxl_pipe, tmp_path, num_inference_steps=steps)
    assert_helpful(str(refused.value))


def test_tlora_scheduled_refuses_a_schedule_that_is_not_one(sdxl_pipe, tmp_path):
    for schedule in ([1, 2], {"num_train_timesteps": 1000, "chunks": [{"adapter": "a", "file": "../../etc/x",
                                                                       "components": [0, 1], "on_below": 5}]}):
        (tmp_path / "schedule.json").write_text(json.dumps(schedule))
        with pytest.raises(UsageError, match="is not a T-LoRA schedule") as refused:
            tlora.scheduled(sdxl_pipe, tmp_path, num_inference_steps=4)
        assert_helpful(str(refused.value))


# -- 6. inference's bad values, all before the model loads ---------------------------------------------------------
@pytest.mark.parametrize("extra, said", [
    (("--guidance_scale", "101"), "--guidance_scale must be a finite number in [0, 100.0], got 101.0"),
    (("--guidance_scale", "-1"), "--guidance_scale must be a finite number in [0, 100.0]"),
    (("--seed", "-1"), "--seed must be a whole number from 0 to 4294967295, got -1"),
    (("--seed", str(2**32)), "--seed must be a whole number from 0 to 4294967295"),
    (("--device", "meta"), "--device 'meta': tlora runs on cpu, cuda, mps; pass one of them"),
])
def test_inference_refuses_bad_values(run, capsys, no_model, extra, said):
    one_line_error(capsys, inference.main(infer_argv(run, *extra)), said)


@pytest.mark.parametrize("key, value, said", [
    ("pretrained_model_name_or_path", ["a", "b"], "must be text, got ['a', 'b']"),
    ("placeholder_token", {"a": 1}, "must be text, got {'a': 1}"),
    ("revision", 3, "must be text, got 3"),
    ("output_dir", ["x"], "must be text"),
    ("max_sequence_length", [512], "must be a whole number of at least 1, got [512]"),
])
def test_inference_checks_the_types_in_hparams(run, tmp_path, capsys, no_model, key, value, said):
    copy = copy_run(run, tmp_path)
    path = copy / "logs" / "hparams.yml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {key: value}))
    one_line_error(capsys, inference.main(infer_argv(copy)), f"--config_path: {key} in {path} {said}")


def test_inference_refuses_a_run_it_cannot_write_to(run, tmp_path, capsys, no_model):
    copy = copy_run(run, tmp_path)
    (copy / "checkpoint-4" / "samples").write_text("in the way")
    one_line_error(capsys, inference.main(infer_argv(copy)), f"--config_path: {copy / 'checkpoint-4' / 'samples'} is "
                                                              "not a folder; the samples of")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_inference_refuses_a_read_only_run(run, tmp_path, capsys, no_model):
    copy = copy_run(run, tmp_path)
    os.chmod(copy / "checkpoint-4", 0o555)
    try:
        one_line_error(capsys, inference.main(infer_argv(copy)), "(Permission denied); the samples of")
    finally:
        os.chmod(copy / "checkpoint-4", 0o755)


@pytest.mark.slow
def test_a_full_disk_while_sampling_is_one_line(run, tmp_path, capsys, monkeypatch):
    copy = copy_run(run, tmp_path)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generation, "atomic_write", full)
    one_line_error(capsys, inference.main(infer_argv(copy)), "error: inference stopped: the disk holding "
                   f"{copy / 'checkpoint-4' / 'samples'}", exit_code=1)


# -- 7. export's --out ------------------------------------------------------------------------------------------------
def test_export_refuses_an_out_it_cannot_write(run, tmp_path, capsys):
    checkpoint = str(run / "checkpoint-4")
    one_line_error(capsys, exporting.main([checkpoint, "--format", "kohya", "--out", "/proc/tlora.safetensors"]),
                   "--out /proc/tlora.safetensors: cannot write in /proc (No such file or directory); pass a path in a "
                   "folder")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, exporting.main([checkpoint, "--format", "kohya", "--out", str(tmp_path / "file" / "k")]),
                   f"{tmp_path / 'file'} is not a folder; pass a path in a folder you can write to")
    (tmp_path / "ro").mkdir(mode=0o555)
    if not os.access(tmp_path / "ro", os.W_OK):  # root writes anyway
        one_line_error(capsys, exporting.main([checkpoint, "--format", "kohya", "--out", str(tmp_path / "ro" / "k")]),
                       "(Permission denied); pass a path in a folder you can write to")


def full_disk(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers-scheduled", "kohya"])
def test_a_full_disk_while_exporting_is_one_line_and_leaves_nothing(run, tmp_path, capsys, monkeypatch, fmt):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(exporting, "atomic_write", lambda path, data: full_disk())
    out = tmp_path / "out" / "export"
    (tmp_path / "out").mkdir()
    code = exporting.main([str(run / "checkpoint-4"), "--format", fmt, "--out", str(out)])
    one_line_error(capsys, code, f"--out {out}: the disk holding {out.parent} is full; free some space or pass another "
                   "--out", exit_code=1)
    assert list((tmp_path / "out").iterdir()) == []  # no half-written file or folder left


def test_a_failed_scheduled_export_keeps_the_one_it_was_to_replace(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scheduled"
    assert exporting.main([str(run / "checkpoint-4"), "--format", "diffusers-scheduled", "--out", str(out)]) == 0
    before = snapshot(out)
    monkeypatch.setattr(exporting, "atomic_write", lambda path, data: full_disk())
    code = exporting.main([str(run / "checkpoint-4"), "--format", "diffusers-scheduled", "--out", str(out), "--overwrite"])
    one_line_error(capsys, code, "is full", exit_code=1)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["scheduled"]


# -- 8. LyCORIS files ------------------------------------------------------------------------------------------------
LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def lycoris_file(path: Path, config: str, unet, width_change: int = 0, dtype=torch.float32) -> Path:
    """A one-module SimpleTuner / LyCORIS T-LoRA file on one of the tiny UNet's Linears."""
    linear = dict(unet.named_modules())[LINEAR]
    prefix = "lycoris_" + LINEAR.replace(".", "_")
    tensors = {f"{prefix}.q_layer.weight": torch.randn(2, linear.in_features + width_change),
               f"{prefix}.p_layer.weight": torch.randn(linear.out_features, 2),
               f"{prefix}.lambda_layer": torch.ones(1, 2), f"{prefix}.alpha": torch.tensor(2.0)}
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path), metadata={"lycoris_config": config})
    return path


GOOD_CONFIG = json.dumps({"algo": "tlora", "linear_dim": 2, "linear_alpha": 2, "tlora_min_rank": 1})


@pytest.mark.parametrize("config, dtype, said", [
    ("[1, 2]", torch.float32, "its lycoris_config metadata is [1, 2], not a mapping of settings; save it again"),
    ("7", torch.float32, "its lycoris_config metadata is 7, not a mapping"),
    ("[" * 100000, torch.float32, "its lycoris_config metadata is not JSON"),
    (GOOD_CONFIG, torch.int32, "is I32, not floating point"),
])
def test_lycoris_files_that_are_not_t_loras_are_one_line(unet, tmp_path, capsys, config, dtype, said):
    path = lycoris_file(tmp_path / "l.safetensors", config, unet, dtype=dtype)
    one_line_error(capsys, exporting.main([str(path), "--format", "kohya", "--out", str(tmp_path / "k")]), said)
    with pytest.raises(CheckpointError, match="lycoris_config|floating"):
        tlora.load(unet, path)


def test_a_lycoris_file_for_another_model_is_one_line(unet, tmp_path):
    path = lycoris_file(tmp_path / "l.safetensors", GOOD_CONFIG, unet, width_change=3)
    with pytest.raises(UsageError, match="has q_layer.weight of shape .* it was made for another model") as refused:
        tlora.load(unet, path)
    assert_helpful(str(refused.value))
    assert tlora.attached(unet) is None


# -- 9. analyze: records that are not what they should be ------------------------------------------------------------
@pytest.mark.slow
def test_analyze_skips_a_bad_loss_csv_with_a_note(run, tmp_path, capsys):
    copy = copy_run(run, tmp_path)
    loss = copy / "logs" / "loss.csv"
    for data, said in ((b"step,loss\n1,0.5\n\xff\xfe,1\n", f"note: no loss.png: loss log: {loss} is not UTF-8 text; "),
                       (b"step,loss\n1,0.5\n2,lots\n3,0.4\n",
                        f"note: no loss.png: {loss} is not a loss log (a row reads '2,lots'); "),
                       (b"time,value\n1,0.5\n",
                        f"note: no loss.png: {loss} is not a loss log (a row reads 'time,value')")):
        loss.write_bytes(data)
        assert analysis.main([str(copy)]) == 0
        assert said in capsys.readouterr().err
        assert not (copy / "analysis" / "loss.png").exists() and (copy / "analysis" / "rank_schedule.png").is_file()


@pytest.mark.parametrize("data, said", [
    (b"trainer_type: \xff\n", "is not UTF-8 text; pass a run's logs/hparams.yml"),
    (b"- a\n- b\n", "is not a mapping of option names"),
    (b"lora_rank: [4]\n", "lora_rank must be int, got [4]"),
    (b"lora_rank: 4\nlora_rank: 5\n", "is not valid YAML at line 2"),
])
def test_analyze_refuses_a_bad_hparams_in_one_line_and_writes_nothing(run, tmp_path, capsys, data, said):
    copy = copy_run(run, tmp_path)
    (copy / "logs" / "hparams.yml").write_bytes(data)
    one_line_error(capsys, analysis.main([str(copy)]), said)
    assert not (copy / "analysis").exists()
