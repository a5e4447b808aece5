"""Every bad input gets one `error:` line and exit code 2 before any model loads, and leaves nothing behind.

The commands are pointed at models that cannot load (or need no load at all), so a check that came too
late would fail with another error, not with the expected line.
"""

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import tlora
from tlora.common.images import load_pixels, open_rgb
from tlora.runs.weights import WEIGHTS_NAME

import inference
import train
from conftest import make_image, one_line_error, read_weights, train_args, with_flags


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "text.jpg").write_text("not an image at all")
    make_image(folder / "small.png", size=(32, 80))
    grey16 = (np.arange(64 * 80).reshape(80, 64) * 8).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    return folder


def config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return ("--config", str(path))


@pytest.mark.parametrize("change, message", [
    (lambda t, d: config(t, "lora_rank: [4\n"), "is not valid YAML at line"),
    (lambda t, d: config(t, "num_train_epochs: 800.0\n"), "--num_train_epochs must be int, got 800.0"),
    (lambda t, d: config(t, "class_name: 123\n"), "--class_name must be str, got 123"),
    (lambda t, d: config(t, "with_prior_preservation: 1\n"), "--with_prior_preservation must be true/false"),
    (lambda t, d: ("--learning_rate", "nan"), "--learning_rate must be a finite number in (0, inf), got nan"),
    (lambda t, d: ("--learning_rate", "inf"), "--learning_rate must be a finite number in (0, inf), got inf"),
    (lambda t, d: ("--alpha_rank_scale", "0"), "--alpha_rank_scale must be a finite number in (0, inf)"),
    (lambda t, d: ("--alpha_rank_scale", "-1"), "--alpha_rank_scale must be a finite number in (0, inf)"),
    (lambda t, d: ("--adam_beta2", "1"), "--adam_beta2 must be a finite number in [0, 1)"),
    (lambda t, d: ("--one_image", "../elsewhere.png"), "--one_image: ../elsewhere.png must be a file name inside"),
    (lambda t, d: ("--report_to", "tensorboard"), "--report_to tensorboard needs tensorboard"),
    (lambda t, d: ("--pretrained_model_name_or_path", str(t / "nothing")), "does not exist; pass a local folder"),
    (lambda t, d: ("--pretrained_model_name_or_path", str(d)), "has no model_index.json"),
    (lambda t, d: ("--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"),
     "madebyollin/sdxl-vae-fp16-fix is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    (lambda t, d: ("--output_dir", str(d / "00.png" / "runs")), "--output_dir: cannot write in"),
    (lambda t, d: ("--validation_prompts", "a {0} with {other}"), "has the field {other}; only {0}"),
    (lambda t, d: ("--validation_prompts", "a {0} with }"), "has unbalanced braces"),
    (lambda t, d: ("--validation_prompts", "a {0}\nb"), "holds a control character"),
    (lambda t, d: ("--validation_prompts", "x" * 1001), "has 1001 characters; the limit is 1000"),
    (lambda t, d: ("--placeholder_token", "s" * 65), "has 65 characters; the limit is 64"),
    (lambda t, d: ("--checkpoints_total_limit", "0"), "--checkpoints_total_limit must be at least 1"),
    (lambda t, d: ("--resume_from_checkpoint", str(t)), "is neither a checkpoint-N folder, a run folder nor 'latest'"),
    (lambda t, d: ("--lora_r", "8"), "unrecognized arguments: --lora_r 8"),  # no abbreviations
])
def test_train_rejects(tiny_model, image_dir, tmp_path, capsys, change, message):
    argv = train_args(tiny_model, image_dir, tmp_path / "out", *change(tmp_path, image_dir))
    one_line_error(capsys, train.main(argv), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, message", [
    ("corrupt.png", "corrupt.png is not a readable image"), ("text.jpg", "text.jpg is not a readable image"),
    ("small.png", "small.png is 32x80; images need at least 64 px"),
])
def test_training_images_are_checked_up_front(tiny_model, bad_images, tmp_path, capsys, name, message):
    argv = train_args(tiny_model, bad_images, tmp_path / "out", "--one_image", name)
    one_line_error(capsys, train.main(argv), f"--train_data_dir: {message}")
    assert not (tmp_path / "out").exists()


def test_sixteen_bit_grey_is_scaled_not_clipped(bad_images):
    rgb = np.asarray(open_rgb(bad_images / "grey16.png")).astype(float)
    expected = (np.arange(64 * 80).reshape(80, 64) * 8) / 257.0
    assert np.abs(rgb[..., 0] - expected).max() <= 0.5 and (rgb[..., 0] == rgb[..., 2]).all()
    pixels, _ = load_pixels(bad_images / "grey16.png", 64)
    assert -1 <= float(pixels.min()) and float(pixels.mean()) < 0  # dark on average, as the image is


def test_secret_is_never_echoed_however_spelled(tiny_model, image_dir, tmp_path, capsys):
    secret = "SECRETwandbKEY0123456789"
    for spelling in (["--wandb_api_k", secret], ["--wandb-api-key", secret], [f"--wandb_api_k={secret}"]):
        code = train.main(train_args(tiny_model, image_dir, tmp_path / "out", *spelling))
        err = one_line_error(capsys, code, "unrecognized arguments")
        assert secret not in err and "<redacted>" in err


def test_failure_after_the_run_folder_leaves_nothing(tiny_model, image_dir, tmp_path, monkeypatch):
    """A failure while loading (before step 1) removes the new run folder."""
    from tlora.common.errors import RunFailed
    from tlora.train import trainer as training
    from tlora.train.options import parse_args

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while loading")

    monkeypatch.setattr(training, "load_pipeline", broken)
    with pytest.raises(RunFailed, match="training failed at step 0: RuntimeError: out of memory while "
                                        "loading .traceback in .*; nothing was kept") as failed:
        training.train(parse_args(train_args(tiny_model, image_dir, tmp_path / "out")))
    assert list((tmp_path / "out").iterdir()) == []
    traceback = str(failed.value).split("traceback in ")[1].split(")")[0]
    assert "out of memory while loading" in open(traceback).read()


@pytest.fixture(scope="module")
def run_folder(tiny_model, image_dir, tmp_path_factory):
    from tlora.train.options import parse_args
    from tlora.train.trainer import train as train_run

    return train_run(parse_args(train_args(tiny_model, image_dir, tmp_path_factory.mktemp("runs"),
                                           "--num_train_epochs", "1", "--lora_rank", "4")))


def infer_argv(run, *extra):
    return with_flags(["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "1", "--prompts", "a {0}"],
                      extra)


@pytest.mark.parametrize("extra, message", [
    (("--guidance_scale", "nan"), "--guidance_scale must be a finite number"),
    (("--device", "cuda"), "--device cuda: no CUDA GPU is available here; pass --device cpu"),
    (("--device", "gpu0"), "--device: 'gpu0' is not a device"),
    (("--checkpoint_idx", "../1"), "--checkpoint_idx must be a step number"),
    (("--prompts", "a {1}"), "has the field {1}"),
    (("--num_inference_steps", "0"), "--num_inference_steps must be at least 1"),
    (("--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"), "is not in the Hugging Face cache"),
])
def test_inference_rejects(run_folder, capsys, extra, message):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(capsys, inference.main(infer_argv(run_folder, *extra)), message)


def copy_run(run_folder, tmp_path, weights, hparams_changes=None):
    run = tmp_path / run_folder.name
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "logs").mkdir()
    hp = yaml.safe_load((run_folder / "logs" / "hparams.yml").read_text()) | {"output_dir": str(run)}
    (run / "logs" / "hparams.yml").write_text(yaml.safe_dump(hp | (hparams_changes or {})))
    if isinstance(weights, bytes):
        (run / "checkpoint-1" / WEIGHTS_NAME).write_bytes(weights)
    else:
        save_file(weights, str(run / "checkpoint-1" / WEIGHTS_NAME), metadata={"format": "pt"})
    return run


def test_inference_rejects_damaged_and_foreign_checkpoints(run_folder, tmp_path, capsys):
    data = (run_folder / "checkpoint-1" / WEIGHTS_NAME).read_bytes()
    truncated = copy_run(run_folder, tmp_path / "t", data[: len(data) // 2])
    one_line_error(capsys, inference.main(infer_argv(truncated)), "is damaged (truncated or not a safetensors file")
    other = copy_run(run_folder, tmp_path / "o", read_weights(run_folder / "checkpoint-1")[0],
                     {"trainer_type": "lora", "lora_rank": 8})
    one_line_error(capsys, inference.main(infer_argv(other)),
                   "this is a ortho_lora checkpoint, rank 4, but the settings say trainer_type lora, lora_rank 8")


def test_api_checks_its_settings(tiny_pipe, run_folder):
    checkpoint = run_folder / "checkpoint-1"
    with pytest.raises(ValueError, match=r"min_rank \(99\) must not exceed lora_rank \(4\)"):
        tlora.load(tiny_pipe, checkpoint, min_rank=99)
    with pytest.raises(ValueError, match="trainer_class must be one of sdxl_lora, sdxl_tlora, flux_lora, flux_tlora, klein_lora, klein_tlora, got 'nonsense'"):
        tlora.load(tiny_pipe, checkpoint, trainer_class="nonsense")
    with pytest.raises(ValueError, match="this is a ortho_lora checkpoint, rank 4"):
        tlora.load(tiny_pipe, checkpoint, lora_rank=8)
    assert tlora.attached(tiny_pipe.unet) is None  # nothing left attached by a refused load
    tlora.load(tiny_pipe, checkpoint)
    try:
        for bad in (math.nan, math.inf, "1"):
            with pytest.raises(ValueError, match="scale must be a finite number"):
                tlora.set_scale(tiny_pipe, bad)
        assert tlora.attached(tiny_pipe.unet).state.scale == 1.0
    finally:
        tlora.unload(tiny_pipe)


def test_evaluate_checks_inputs_before_loading_models(tmp_path, capsys):
    from tlora.evaluation.evaluate import main

    samples = tmp_path / "samples" / "a photo of sks"
    samples.mkdir(parents=True)
    make_image(samples / "0.png")
    base = ["--samples", str(tmp_path / "samples"), "--class_name", "dog", "--placeholder_token", "sks"]
    one_line_error(capsys, main(["--reference", str(tmp_path / "none.png"), *base,
                                 "--clip_model", "/no/such/clip"]), "--reference: ")
    make_image(tmp_path / "ref.png")
    one_line_error(capsys, main(["--reference", str(tmp_path / "ref.png"), *base]),
                   "--clip_model: openai/clip-vit-base-patch32 is not in the Hugging Face cache and HF_HUB_OFFLINE "
                   "is set; download it first (hf download openai/clip-vit-base-patch32) or pass a local folder")


def test_analyze_and_benchmark_and_demo_lines(tmp_path, capsys):
    from tlora.evaluation import analyze
    from tlora.evaluation import protocol as benchmark

    one_line_error(capsys, analyze.main([str(tmp_path)]), "is neither a run folder")
    with pytest.raises(SystemExit) as done:
        benchmark.main(["--help"])
    assert done.value.code == 0 and "manifest" in capsys.readouterr().out
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"output_dir": "b", "concepts": [{"name": "x"}], "methods": []}))
    one_line_error(capsys, benchmark.main([str(tmp_path / "m.yaml")]), "methods is required")


def test_checkpoint_files_respect_the_umask(tmp_path):
    import os

    from tlora.common.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", b"x")
        os.umask(0o077)
        atomic_write(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600
