"""Every bad input gets one `error:` line and exit code 2 before any model loads, and leaves nothing behind.

The commands are pointed at models that cannot load (or need no load at all), so a check that came too
late would fail with another error, not with the expected line.
"""

import math
import warnings
from pathlib import Path

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
from conftest import one_line_error
from helpers import make_image, read_weights, train_args, with_flags


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
    (lambda t, d: ("--checkpoints_total_limit", "0"), "--checkpoints_total_limit must be a whole number of at least 1"),
    (lambda t, d: ("--validation_prompts", "a {0}", "--validation_height", "65"),
     "--validation_height must be a positive multiple of 8 pixels for this model, got 65; pass e.g. 64"),
    (lambda t, d: ("--resume_from_checkpoint", str(t)),
     "is neither a checkpoint-N folder of a run, a run folder nor 'latest'"),
    (lambda t, d: ("--lora_r", "8"), "unrecognized arguments: --lora_r 8"),  # no abbreviations
])
def test_train_rejects(tiny_sdxl, image_dir, tmp_path, capsys, change, message):
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", *change(tmp_path, image_dir))
    one_line_error(capsys, train.main(argv), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, message", [
    ("corrupt.png", "corrupt.png is not a readable image"), ("text.jpg", "text.jpg is not a readable image"),
    ("small.png", "small.png is 32x80; images need at least 64 px"),
])
def test_training_images_are_checked_up_front(tiny_sdxl, bad_images, tmp_path, capsys, name, message):
    argv = train_args(tiny_sdxl, bad_images, tmp_path / "out", "--one_image", name)
    one_line_error(capsys, train.main(argv), f"--train_data_dir: {message}")
    assert not (tmp_path / "out").exists()


def test_sixteen_bit_grey_is_scaled_not_clipped(bad_images):
    rgb = np.asarray(open_rgb(bad_images / "grey16.png")).astype(float)
    expected = (np.arange(64 * 80).reshape(80, 64) * 8) / 257.0
    assert np.abs(rgb[..., 0] - expected).max() <= 0.5 and (rgb[..., 0] == rgb[..., 2]).all()
    pixels, _ = load_pixels(bad_images / "grey16.png", 64)
    assert -1 <= float(pixels.min()) and float(pixels.mean()) < 0  # dark on average, as the image is


def test_secret_is_never_echoed_however_spelled(tiny_sdxl, image_dir, tmp_path, capsys):
    secret = "SECRETwandbKEY0123456789"
    for spelling in (["--wandb_api_k", secret], ["--wandb-api-key", secret], [f"--wandb_api_k={secret}"]):
        code = train.main(train_args(tiny_sdxl, image_dir, tmp_path / "out", *spelling))
        err = one_line_error(capsys, code, "unrecognized arguments")
        assert secret not in err and "<redacted>" in err


@pytest.mark.slow
def test_failure_after_the_run_folder_leaves_nothing(tiny_sdxl, image_dir, tmp_path, monkeypatch):
    """A failure while loading (before step 1) removes the new run folder."""
    from tlora.common.errors import RunFailed
    from tlora.train import trainer as training
    from tlora.train.options import parse_args

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while loading")

    monkeypatch.setattr(training, "load_pipeline", broken)
    with pytest.raises(RunFailed, match="training failed at step 0: RuntimeError: out of memory while "
                                        "loading .traceback in .*; nothing was kept") as failed:
        training.train(parse_args(train_args(tiny_sdxl, image_dir, tmp_path / "out")))
    assert list((tmp_path / "out").iterdir()) == []
    traceback = str(failed.value).split("traceback in ")[1].split(")")[0]
    assert "out of memory while loading" in open(traceback).read()


@pytest.fixture(scope="module")
def run_folder(trained_run):
    """A one-step run (checkpoint-1), shared: read only."""
    return trained_run(num_train_epochs=1, lora_rank=4)


def infer_argv(run, *extra):
    hparams = str(run / "logs" / "hparams.yml")
    return with_flags(["--config_path", hparams, "--checkpoint_idx", "1", "--prompts", "a {0}"], extra)


@pytest.mark.parametrize("extra, message", [
    (("--guidance_scale", "nan"), "--guidance_scale must be a finite number"),
    (("--device", "cuda"), "--device cuda: no CUDA GPU is available here; pass --device cpu"),
    (("--device", "gpu0"), "--device: 'gpu0' is not a device"),
    (("--checkpoint_idx", "../1"), "--checkpoint_idx must be a step number"),
    (("--prompts", "a {1}"), "has the field {1}"),
    (("--num_inference_steps", "0"), "--num_inference_steps must be a whole number of at least 1"),
    (("--height", "100"), "--height must be a positive multiple of 8 pixels for this model, got 100; pass e.g. 96"),
    (("--width", "0"), "--width must be a positive multiple of 8 pixels for this model, got 0; pass e.g. 8"),
    (("--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"), "is not in the Hugging Face cache"),
])
def test_inference_rejects(run_folder, capsys, extra, message):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(capsys, inference.main(infer_argv(run_folder, *extra)), message)


def run_with_weights(run_folder, tmp_path, weights, hparams_changes=None):
    """A run like `run_folder` whose checkpoint-1 holds `weights` (bytes, or tensors) and whose hparams.yml has
    `hparams_changes`."""
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
    truncated = run_with_weights(run_folder, tmp_path / "t", data[: len(data) // 2])
    one_line_error(capsys, inference.main(infer_argv(truncated)), "is damaged (truncated or not a safetensors file")
    other = run_with_weights(run_folder, tmp_path / "o", read_weights(run_folder / "checkpoint-1")[0],
                             {"trainer_type": "lora", "lora_rank": 8})
    one_line_error(capsys, inference.main(infer_argv(other)),
                   "this is a ortho_lora checkpoint, rank 4, but the settings say trainer_type lora, lora_rank 8")


def test_api_checks_its_settings(sdxl_pipe, run_folder):
    checkpoint = run_folder / "checkpoint-1"
    with pytest.raises(ValueError, match=r"min_rank \(99\) must not exceed lora_rank \(4\)"):
        tlora.load(sdxl_pipe, checkpoint, min_rank=99)
    with pytest.raises(ValueError, match="trainer_class must be one of sdxl_lora, sdxl_tlora, .* got 'nonsense'"):
        tlora.load(sdxl_pipe, checkpoint, trainer_class="nonsense")
    with pytest.raises(ValueError, match="this is a ortho_lora checkpoint, rank 4"):
        tlora.load(sdxl_pipe, checkpoint, lora_rank=8)
    assert tlora.attached(sdxl_pipe.unet) is None  # nothing left attached by a refused load
    tlora.load(sdxl_pipe, checkpoint)
    try:
        for bad in (math.nan, math.inf, "1"):
            with pytest.raises(ValueError, match="scale must be a finite number"):
                tlora.set_scale(sdxl_pipe, bad)
        assert tlora.attached(sdxl_pipe.unet).state.scale == 1.0
    finally:
        tlora.unload(sdxl_pipe)


def test_evaluate_checks_inputs_before_loading_models(tmp_path, capsys):
    from tlora.evaluation.scoring import main

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
    from tlora.evaluation import analysis
    from tlora.evaluation import paper_protocol as benchmark

    one_line_error(capsys, analysis.main([str(tmp_path)]), "is neither a run folder")
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


# -- every bad value refused up front, every change to what was asked said --------------------------------------
def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


BOMB = "lora_rank: [&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(  # 10**9 strings, were it printed in full
    f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]\n"


@pytest.mark.parametrize("again, message", [
    (("--lora_rank", "8"), "--lora_rank 8 contradicts --lora_rank 4 given before"),
    (("--lora_rank=8",), "--lora_rank 8 contradicts --lora_rank 4 given before"),
    (("--rank", "8"), "--rank 8 contradicts --lora_rank 4 given before; give the flag once"),
    (("--instance_data_dir", "elsewhere"), "--instance_data_dir 'elsewhere' contradicts --train_data_dir"),
])
def test_a_flag_given_twice_with_two_values_is_refused(tiny_sdxl, image_dir, tmp_path, capsys, again, message):
    one_line_error(capsys, train.main(train_args(tiny_sdxl, image_dir, tmp_path / "out") + list(again)), message)


@pytest.mark.parametrize("extra, message", [
    (lambda t: ("--config", write(t, "c.yaml", "rank: 4\nlora_rank: 8\n")),
     "gives rank and lora_rank, two names of --lora_rank, different values; drop one of them"),
    (lambda t: ("--config", write(t, "c.yaml", b"lora_rank: 4\n\xff\xfe\n")), "--config: "),
    (lambda t: ("--config", write(t, "c.yaml", "- lora_rank\n- 4\n")), "must hold a mapping of flag names"),
    (lambda t: ("--config", write(t, "c.yaml", "[1, 2]: 4\n")), "(a list cannot be a key)"),
    (lambda t: ("--config", write(t, "c.yaml", BOMB)),
     "--lora_rank must be int, got [['x', 'x', 'x', 'x', ...], [[...], "),
    (lambda t: ("--config", write(t, "c.yaml", "seed: " + "[" * 100000)), "holds values nested too deeply"),
    (lambda t: ("--config", write(t, "c.yaml", "seed: " + "9" * 5000)), "numbers too long to read"),
    (lambda t: ("--config", write(t, "c.yaml", f"learning_rate: {10**400}")),
     "--learning_rate must be a finite number in (0, inf), got 100000000000000000...000"),
    (lambda t: ("--seed", "-1"), "--seed must be a whole number from 0 to 4294967295, got -1"),
    (lambda t: ("--seed", str(2**32)), "--seed must be a whole number from 0 to 4294967295, got 4294967296"),
    (lambda t: ("--class_name", "dog\udcff"), "--class_name: the text is not valid UTF-8"),
    (lambda t: ("--validation_prompts", "a {0}\udcff"), "--validation_prompts: the text is not valid UTF-8"),
    (lambda t: ("--config", write(t, "c.yaml", 'class_name: "dog\\udcff"\n')), "the text is not valid UTF-8"),
    (lambda t: ("--validation_prompts", "#"), "--validation_prompts '#' holds no prompt"),
    (lambda t: ("--validation_prompts", " # "), "holds no prompt ('#' separates prompts)"),
    (lambda t: ("--resolution", "8"), "--resolution must be a multiple of 8 for sdxl, at least 64, got 8"),
])
def test_train_refuses_up_front(tiny_sdxl, image_dir, tmp_path, capsys, extra, message):
    import time

    start = time.perf_counter()
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", *extra(tmp_path))
    one_line_error(capsys, train.main(argv), message)
    assert time.perf_counter() - start < 20 and not (tmp_path / "out").exists()


def test_a_flag_repeated_with_its_value_is_fine(tiny_sdxl, image_dir, tmp_path):
    from tlora.train.options import parse_args

    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--lora_rank", "4") + ["--rank", "4", "--lora_rank=4"]
    assert parse_args(argv).lora_rank == 4


def test_a_secret_in_a_config_is_never_echoed(tiny_sdxl, image_dir, tmp_path, capsys):
    secret = "SECRETwandbKEY0123456789"
    for value in (f"[{secret}]", f"{{key: {secret}}}", "12345678901234567890"):
        config = write(tmp_path, "c.yaml", f"wandb_api_key: {value}\n")
        err = one_line_error(capsys, train.main(train_args(tiny_sdxl, image_dir, tmp_path / "o", "--config", config)),
                             "--wandb_api_key must be str, got <redacted>")
        assert secret not in err and "1234567890" not in err


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    make_image(folder / "00.png", size=(96, 80))
    return folder


def test_a_link_to_nothing_in_the_data_is_refused(tiny_sdxl, data, tmp_path, capsys):
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    one_line_error(capsys, train.main(train_args(tiny_sdxl, data, tmp_path / "out")),
                   f"--train_data_dir: gone.png in {data} is a link to nothing")


@pytest.mark.parametrize("mask, message", [
    (lambda d: Image.new("L", (96, 80), 0), "--mask_dir: 00.png is all black where the image is cropped to train"),
    (lambda d: Image.new("L", (64, 64), 255), "--mask_dir: 00.png is 64x64 but its image 00.png is 96x80"),
    (lambda d: Image.fromarray(np.pad(np.zeros((80, 80), np.uint8), ((0, 0), (8, 8)), constant_values=255)),
     "is all black where the image is cropped to train"),  # white only outside the centre crop
])
def test_a_mask_that_leaves_nothing_to_learn_is_refused(tiny_sdxl, data, tmp_path, capsys, mask, message):
    (tmp_path / "masks").mkdir()
    mask(data).save(tmp_path / "masks" / "00.png")
    argv = train_args(tiny_sdxl, data, tmp_path / "out", "--mask_dir", str(tmp_path / "masks"))
    one_line_error(capsys, train.main(argv), message)


def test_a_fully_transparent_image_with_alpha_mask_is_refused(tiny_sdxl, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    Image.new("RGBA", (96, 80), (255, 0, 0, 0)).save(tmp_path / "data" / "00.png")
    argv = train_args(tiny_sdxl, tmp_path / "data", tmp_path / "out", "--alpha_mask")
    one_line_error(capsys, train.main(argv), "--alpha_mask: 00.png is fully transparent where the image is cropped")


def notes_of(argv) -> tuple[object, list[str]]:
    from tlora.common.messages import Note
    from tlora.train.options import parse_args

    with pytest.warns(Note) as said:
        opts = parse_args(argv)
    return opts, [str(w.message) for w in said if issubclass(w.category, Note)]


def test_what_changes_the_request_is_said_and_recorded(tiny_sdxl, data, class_dir, tmp_path, monkeypatch):
    from tlora.runs.run_folder import public_hparams

    frames = [Image.new("RGB", (96, 80), c) for c in ("red", "blue")]
    frames[0].save(data / "01.png", save_all=True, append_images=frames[1:])  # an animated PNG
    monkeypatch.chdir(tiny_sdxl.parent)
    argv = train_args(Path(tiny_sdxl.name), data, tmp_path / "out", "--train_batch_size", "100000",
                      "--class_data_dir", str(class_dir), "--trainer_class", "sdxl_lora", "--sig_type", "principal",
                      "--trainer_type", "lora")
    opts, notes = notes_of(argv)
    assert opts.train_batch_size == 2 and public_hparams(opts)["train_batch_size"] == 2
    assert any("--train_batch_size 100000: there are 2 training items, so a batch holds 2" in n for n in notes)
    assert any("01.png is animated (2 frames); its first frame is used" in n for n in notes)
    assert any(n.startswith("--class_data_dir has no effect without --with_prior_preservation") for n in notes)
    assert any(n.startswith("--min_rank has no effect with --trainer_class sdxl_lora") for n in notes)
    assert any(n.startswith("--sig_type has no effect with --trainer_type lora") for n in notes)
    assert opts.pretrained_model_name_or_path == str(tiny_sdxl)  # a relative model folder, recorded absolute
    assert public_hparams(opts)["train_data_dir"] == str(data)


def test_flux_min_rank_without_the_mask_is_said(tiny_flux, image_dir, tmp_path):
    from helpers import flux_train_args

    argv = [a for a in flux_train_args(tiny_flux, image_dir, tmp_path / "out") if a != "--tlora"]
    _, notes = notes_of(argv)
    assert any(n.startswith("--min_rank has no effect with --trainer_class flux_lora (no timestep mask); drop it, or "
                            "pass --trainer_class flux_tlora (or --tlora) to use it") for n in notes)


@pytest.mark.slow
def test_a_run_started_elsewhere_samples_from_anywhere(tiny_sdxl, image_dir, tmp_path, monkeypatch):
    """hparams.yml records local paths absolute: inference.py from another folder finds the model."""
    from tlora.train.options import parse_args
    from tlora.train.trainer import train as train_run

    monkeypatch.chdir(tiny_sdxl.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train_run(parse_args(train_args(Path(tiny_sdxl.name), image_dir, Path("rel_out"), "--num_train_epochs",
                                              "1")))
    monkeypatch.chdir(tmp_path)
    assert inference.main(["--config_path", str(run / "logs" / "hparams.yml"), "--checkpoint_idx", "1", "--prompts",
                           "a {0}", "--num_images_per_prompt", "1", "--num_inference_steps", "1"]) == 0


def test_a_vae_of_another_family_is_refused_before_loading(tiny_sdxl, tiny_flux, image_dir, run_folder, tmp_path,
                                                          capsys):
    vae = str(tiny_flux / "vae")
    message = f"--pretrained_vae_model_name_or_path: {vae} is AutoencoderKL with 16 latent channels"
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--pretrained_vae_model_name_or_path", vae)
    one_line_error(capsys, train.main(argv), message)
    one_line_error(capsys, inference.main(infer_argv(run_folder, "--pretrained_vae_model_name_or_path", vae)), message)


def test_a_prompt_the_text_encoder_cuts_is_said(tiny_sdxl, image_dir, run_folder, tmp_path):
    from tlora.common.messages import Note
    from tlora.generate.inference import parse_args as parse_inference

    long = "a {0} " + "on a very long road " * 30
    _, notes = notes_of(train_args(tiny_sdxl, image_dir, tmp_path / "out", "--validation_prompts", f"a {{0}}#{long}"))
    cut = [n for n in notes if "the rest is cut" in n]
    assert len(cut) == 1 and cut[0].startswith("the prompt 'a sks dog on")
    with pytest.warns(Note, match="--prompts: the prompt 'a sks dog on a very long .* the rest is cut; shorten it"):
        parse_inference(infer_argv(run_folder, "--prompts", long))


@pytest.mark.parametrize("line", [
    "error: --config c.yaml: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff; fix the file",
    "error: training failed at step 0: KeyError: 'x' (traceback in /tmp/e.txt); pass --seed",
    "error: --out /proc/x: SafetensorError: os error 2; pass another path",
])
def test_the_error_check_fails_on_an_internal_exception(line):
    from conftest import assert_helpful

    with pytest.raises(AssertionError, match="an internal error reached the user"):
        assert_helpful(line)


@pytest.mark.parametrize("line", [
    "error: --seed must be at least 0, got -1",  # the problem, no fix
    "error: cannot read /tmp/run/logs/hparams.yml: the run must be checked",  # "run" and "must" as words
    "error: --config c.yaml is not a mapping; check",  # "check" is no fix
    "error: --output_dir /x is not writable; set",  # a verb without an object
    "error: the manifest lists model.safetensors twice",
    "error: /run/model.safetensors: load error",  # a verb of the list used as a noun...
    "error: /x.yml: copy failed",
    "error: --x /p: download failed",
    "error: /run/logs/loss.csv: train loss is NaN at step 5",
    "error: --resolution: start value is too big",
    "error: /p: use of a removed key",
    "error: --lora_rank: keep in mind it is 0",  # ...or with no object
    "error: --seed: give up",
    "error: (resume state written by another tool)",
    "error: the share is 0.95; pass a smaller one",  # a decimal is no file name
])
def test_the_error_check_fails_on_a_message_without_a_fix(line):
    from conftest import assert_helpful

    with pytest.raises(AssertionError, match="not a helpful error"):
        assert_helpful(line)


@pytest.mark.parametrize("line", [
    "error: --seed must be at least 0, got -1; pass a whole number from 0",
    "error: /tmp/x.yml: duplicate key seed; remove one of them",
    "error: --resume_from_checkpoint: run.lock is held; wait for it to end (or delete /r/.tlora.lock)",
    "error: training diverged at step 3; lower --learning_rate (or set --max_grad_norm) and start a new run",
    "error: /x.png is not a readable image; remove or replace it",  # the object after a second verb
    "error: --device gpu is not a device; pass cpu, cuda or cuda:N",
    "error: --optimizer prodigy needs prodigyopt: pip install prodigyopt",
    "error: --utilization 0.01 is too small; pass a share of at least 0.05, such as 0.4",
])
def test_the_error_check_passes_a_message_with_a_fix(line):
    from conftest import assert_helpful

    assert_helpful(line)

