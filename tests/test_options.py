"""Bad input fails with one clear line, before any model is loaded; --config and flags combine."""

from pathlib import Path

import pytest
import yaml

import train
from conftest import REPO, train_args
from tlora.options import parse_args

NO_MODEL = "/nonexistent/model"


def index_only(tmp_path: Path, pipeline: str = "StableDiffusionXLPipeline") -> Path:
    """A model folder with a model_index.json and no weights: the family can be read, loading would fail with
    another error, so the checks must come first."""
    folder = tmp_path / "index-only"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    return folder


def run_main(argv, capsys):
    code = train.main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    return tmp_path / "empty"


def args_with(image_dir, tmp_path, *extra):
    return train_args(index_only(tmp_path), image_dir, tmp_path / "out", *extra)


@pytest.mark.parametrize(
    "change, message",
    [
        (("--train_data_dir", "/no/such/folder"), "--train_data_dir: folder /no/such/folder does not exist"),
        (("--one_image", "missing.jpg"), "--one_image: missing.jpg is not a file in"),
        (("--lora_rank", "4", "--min_rank", "8"), "--min_rank (8) must not exceed --lora_rank (4)"),
        (("--lora_rank", "0"), "--lora_rank and --min_rank must be positive"),
        (("--resolution", "100"), "--resolution must be a positive multiple of 8"),
        (("--with_prior_preservation",), "--class_data_dir: folder None does not exist"),
        (("--num_train_epochs", "0"), "--num_train_epochs must be at least 1"),
    ],
)
def test_bad_input_fails_before_loading(image_dir, tmp_path, capsys, change, message):
    code, err = run_main(args_with(image_dir, tmp_path, *change), capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing created


def test_8bit_adam_without_bitsandbytes_or_cuda(image_dir, tmp_path, capsys):
    code, err = run_main(args_with(image_dir, tmp_path, "--use_8bit_adam"), capsys)
    assert code == 2 and "--use_8bit_adam needs" in err


def test_no_images(image_dir, tmp_path, capsys, empty_dir):
    argv = args_with(image_dir, tmp_path)
    argv[argv.index("--train_data_dir") + 1] = str(empty_dir)
    code, err = run_main(argv, capsys)
    assert code == 2 and "--train_data_dir: no images" in err


def test_unknown_sig_type_on_command_line(image_dir, tmp_path, capsys):
    code, err = run_main(args_with(image_dir, tmp_path, "--sig_type", "random"), capsys)
    assert code == 2 and err.count("\n") == 1 and "--sig_type: invalid choice: 'random'" in err


def test_unknown_sig_type_in_config(image_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"sig_type": "random"}))
    code, err = run_main(args_with(image_dir, tmp_path, "--config", str(cfg)), capsys)
    assert code == 2 and "--sig_type must be one of principal, last, middle, got 'random'" in err


def test_missing_required_flag(image_dir, tmp_path, capsys):
    argv = args_with(image_dir, tmp_path)
    i = argv.index("--class_name")
    del argv[i : i + 2]
    code, err = run_main(argv, capsys)
    assert code == 2 and "--class_name is required" in err


def test_config_file_and_flag_override(tiny_model, image_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lora_rank": 64, "min_rank": 32, "num_train_epochs": 800, "sig_type": "middle"}))
    argv = train_args(tiny_model, image_dir, tmp_path / "out", "--config", str(cfg))
    for flag in ("--lora_rank", "--min_rank", "--num_train_epochs"):  # drop the helper's own values
        i = argv.index(flag)
        del argv[i : i + 2]
    args = parse_args(argv + ["--num_train_epochs", "500"])
    assert (args.lora_rank, args.min_rank, args.sig_type, args.num_train_epochs) == (64, 32, "middle", 500)


def test_unknown_config_key(image_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rnk: 3\n")
    code, err = run_main(args_with(image_dir, tmp_path, "--config", str(cfg)), capsys)
    assert code == 2 and "unknown key 'lora_rnk'" in err


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config, tiny_model, image_dir, tmp_path):
    args = parse_args(["--config", str(config), "--train_data_dir", str(image_dir), "--output_dir", str(tmp_path),
                       "--class_name", "dog", "--placeholder_token", "sks", "--pretrained_model_name_or_path",
                       str(tiny_model), "--pretrained_vae_model_name_or_path", "none"])
    assert args.lora_rank == 64 and args.min_rank == 32
