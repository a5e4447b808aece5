"""inference.py and the public API on runs trained by train.py (tiny SDXL, CPU)."""


import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import save_file

from tlora.common.errors import UsageError
from tlora.generate.inference import parse_args as parse_inference
from tlora.runs.weights import WEIGHTS_NAME

import inference
from helpers import read_weights, with_flags

PROMPTS = "a {0} riding a bike#a {0} swimming"


@pytest.fixture(scope="module")
def two_step_run(trained_run):
    """Trained for this module alone (its learning rate), so its tests sample into it in place."""
    return trained_run(num_train_epochs=2, learning_rate="1e-2")


def infer(run, *extra, capsys=None):
    hparams = str(run / "logs" / "hparams.yml")
    argv = with_flags(["--config_path", hparams, "--checkpoint_idx", "2", "--prompts", PROMPTS,
                       "--num_images_per_prompt", "3", "--batch_size", "2", "--num_inference_steps", "3"], extra)
    assert inference.main(argv) == 0
    return run / "checkpoint-2" / "samples" / "ns3_gs5.0"


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_inference_tree_skip_replace_and_seeds(two_step_run, capsys):
    samples = infer(two_step_run)
    version = samples / "version_0"
    assert sorted(p.name for p in version.iterdir()) == ["a sks riding a bike", "a sks swimming", "prompts.yaml"]
    bike = version / "a sks riding a bike"
    assert sorted(p.name for p in bike.iterdir()) == ["0.png", "1.png", "2.png", "grid.png"]
    assert Image.open(bike / "0.png").size == (64, 64) and Image.open(bike / "grid.png").size == (192, 64)
    record = yaml.safe_load((version / "prompts.yaml").read_text())
    seed = sum(map(ord, "a {0} riding a bike"))
    assert record["a sks riding a bike"]["seeds"] == [seed, seed + 1]
    assert record["a sks riding a bike"]["text"] == "a sks dog riding a bike"
    assert not np.array_equal(pixels(bike / "0.png"), pixels(version / "a sks swimming" / "0.png"))
    assert not np.array_equal(pixels(bike / "0.png"), pixels(bike / "1.png"))

    before = {p: p.stat().st_mtime_ns for p in bike.iterdir()}
    first = pixels(bike / "2.png")
    infer(two_step_run)  # already complete: skipped
    assert {p: p.stat().st_mtime_ns for p in bike.iterdir()} == before
    infer(two_step_run, "--replace_inference_output")
    assert all(p.stat().st_mtime_ns != t for p, t in before.items())
    assert np.array_equal(pixels(bike / "2.png"), first)  # same seeds, same images
    infer(two_step_run, "--version", "1")
    assert np.array_equal(pixels(samples / "version_1" / "a sks riding a bike" / "2.png"), first)

    # the pipeline's own size unless told (64 px for the tiny SDXL), recorded; a prompt already done is kept, with a note
    assert record["a sks riding a bike"]["size"] == [64, 64]
    small = infer(two_step_run, "--version", "2", "--height", "32", "--width", "48") / "version_2"
    assert Image.open(small / "a sks riding a bike" / "0.png").size == (48, 32)
    before = {p: p.stat().st_mtime_ns for p in bike.iterdir()}
    capsys.readouterr()
    infer(two_step_run, "--height", "32")
    assert (f"note: {bike} is done and kept as it is, at 64x64; pass --replace_inference_output (or another "
            "--version)") in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in bike.iterdir()} == before
    infer(two_step_run, "--height", "64")  # the size it was made at: done, no note
    assert "is done and kept" not in capsys.readouterr().err


def test_inference_bad_input(two_step_run, capsys):
    assert inference.main(["--config_path", "/no/hparams.yml", "--prompts", "a {0}"]) == 2
    assert "--config_path: '/no/hparams.yml' does not exist" in capsys.readouterr().err
    argv = ["--config_path", str(two_step_run / "logs" / "hparams.yml"), "--checkpoint_idx", "99", "--prompts", "a {0}"]
    assert inference.main(argv) == 2
    assert (f"--checkpoint_idx 99: no T-LoRA weights (pytorch_lora_weights.safetensors or lora.pt) are in "
            f"{two_step_run / 'checkpoint-99'}; pass the N of one of the run's checkpoint-N folders (2)") in \
        capsys.readouterr().err


@pytest.mark.slow
def test_authors_checkpoint_and_hparams(two_step_run, tmp_path):
    """A run folder as the authors' tool writes it: no metadata, their hparams keys, no min_rank/alpha."""
    weights, _ = read_weights(two_step_run / "checkpoint-2")
    run = tmp_path / "00001-beef-dog_tortho_lora4"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "logs").mkdir()
    save_file(weights, str(run / "checkpoint-2" / WEIGHTS_NAME), metadata={"format": "pt"})
    ours = yaml.safe_load((two_step_run / "logs" / "hparams.yml").read_text())
    theirs = {k: ours[k] for k in ("trainer_type", "trainer_class", "pretrained_model_name_or_path", "lora_rank",
                                   "placeholder_token", "class_name", "revision", "seed", "sig_type", "argv",
                                   "exp_name", "logging_dir")}
    theirs |= {"output_dir": str(run), "wandb_api_key": "their-key-stays-unused", "min_rank": 2}
    (run / "logs" / "hparams.yml").write_text(yaml.dump(theirs))
    same = ("--num_images_per_prompt", "1", "--batch_size", "1", "--version", "7")
    theirs_out = infer(run, *same, "--pretrained_vae_model_name_or_path", "none") / "version_7" / "a sks swimming"
    ours_out = infer(two_step_run, *same) / "version_7" / "a sks swimming"
    assert np.array_equal(pixels(theirs_out / "0.png"), pixels(ours_out / "0.png"))


def test_a_copied_run_is_read_where_it_is(two_step_run, tmp_path):
    """Its hparams.yml still names the original output_dir; the copy's own checkpoint and folder are used."""
    import shutil

    from helpers import opened, under

    copy = shutil.copytree(two_step_run, tmp_path / two_step_run.name, ignore=shutil.ignore_patterns("samples"))
    assert yaml.safe_load((copy / "logs" / "hparams.yml").read_text())["output_dir"] == str(two_step_run)
    before = sorted(two_step_run.rglob("*"))
    with opened() as paths:
        infer(copy, "--version", "3", "--num_images_per_prompt", "1")
    assert (copy / "checkpoint-2/samples/ns3_gs5.0/version_3/a sks swimming/0.png").is_file()
    assert sorted(two_step_run.rglob("*")) == before and under(paths, two_step_run) == []  # the original: not even read


def test_a_config_beside_hparams_in_logs_reads_its_own_run(two_step_run, tmp_path):
    """A hparams.yml kept under another name in RUN/logs/ means RUN, not the output_dir it records."""
    import shutil

    copy = tmp_path / two_step_run.name
    shutil.copytree(two_step_run, copy, ignore=shutil.ignore_patterns("samples"))
    (copy / "logs" / "hparams_edited.yml").write_text((copy / "logs" / "hparams.yml").read_text())
    args = parse_inference(["--config_path", str(copy / "logs" / "hparams_edited.yml"), "--checkpoint_idx", "2",
                                 "--prompts", "a {0}"])
    assert args.checkpoint == copy / "checkpoint-2"


@pytest.mark.parametrize("step", ["²", "١٢", "-2", "+2", "2.0"])
def test_checkpoint_idx_is_a_plain_step_number(two_step_run, step):
    argv = ["--config_path", str(two_step_run / "logs" / "hparams.yml"), "--prompts", "a {0}"]
    with pytest.raises(UsageError, match="--checkpoint_idx must be a step number"):
        parse_inference(argv + ["--checkpoint_idx", step])
    assert parse_inference(argv + ["--checkpoint_idx", "02"]).checkpoint == two_step_run / "checkpoint-2"


def test_sizes_are_multiples_of_the_familys_latent_pixels():
    from tlora.generate.generation import image_size

    assert image_size(("--height", "--width"), 72, None, 8) == {"height": 72}  # SDXL: 8 pixels per latent
    with pytest.raises(UsageError, match="--height must be a positive multiple of 16 pixels for this model, got 72; "
                                         "pass e.g. 64"):
        image_size(("--height", "--width"), 72, None, 16)  # FLUX, klein: 8 times the 2 x 2 packing
    assert image_size(("--height", "--width"), None, None, 16) == {}  # the pipeline's own


def test_a_loose_config_in_a_folder_named_logs_uses_its_recorded_run(two_step_run, tmp_path):
    """Only a run's own logs/ folder means that run: a folder named logs elsewhere holds loose configs."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "dog.yml").write_text((two_step_run / "logs" / "hparams.yml").read_text())
    with pytest.warns(UserWarning, match="is not in a run's logs/ folder: reading the run its output_dir records"):
        args = parse_inference(["--config_path", str(tmp_path / "logs" / "dog.yml"), "--checkpoint_idx", "2",
                                "--prompts", "a {0}"])
    assert args.checkpoint == two_step_run / "checkpoint-2"
