"""Bad input fails with one clear line, before any model is loaded; --config and flags combine."""

from pathlib import Path

import pytest
import yaml
from PIL import Image

from tlora import families
from tlora.train.options import parse_args

import train
from conftest import assert_helpful
from helpers import REPO, flux_train_args, train_args, with_flags

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
        (("--lora_rank", "0"), "--lora_rank must be a whole number of at least 1, got 0"),
        (("--resolution", "100"), "--resolution must be a multiple of 8 for sdxl, at least 64, got 100"),
        (("--with_prior_preservation",), "--class_data_dir: folder None does not exist"),
        (("--num_train_epochs", "0"), "--num_train_epochs must be a whole number of at least 1"),
    ],
)
def test_bad_input_fails_before_loading(image_dir, tmp_path, capsys, change, message):
    code, err = run_main(args_with(image_dir, tmp_path, *change), capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert_helpful(err)
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


def test_config_file_and_flag_override(tiny_sdxl, image_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lora_rank": 64, "min_rank": 32, "num_train_epochs": 800, "sig_type": "middle"}))
    argv = train_args(tiny_sdxl, image_dir, tmp_path / "out", "--config", str(cfg))
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


@pytest.mark.parametrize("config", sorted(set((REPO / "configs").glob("*.yaml")) - {REPO / "configs/flux_tlora.yaml"}),
                         ids=lambda p: p.stem)
def test_shipped_configs_parse(config, tiny_sdxl, image_dir, tmp_path):
    args = parse_args(["--config", str(config), "--train_data_dir", str(image_dir), "--output_dir", str(tmp_path),
                       "--class_name", "dog", "--placeholder_token", "sks", "--pretrained_model_name_or_path",
                       str(tiny_sdxl), "--pretrained_vae_model_name_or_path", "none"])
    assert args.lora_rank == 64 and args.min_rank == 32


def flux_args(tiny_flux, image_dir, tmp_path, *extra):
    return flux_train_args(tiny_flux, image_dir, tmp_path / "out", *extra)


def test_flux_flags_are_aliases_with_the_authors_defaults(tiny_flux, image_dir, tmp_path):
    args = parse_args(flux_train_args_min(tiny_flux, image_dir, tmp_path))
    assert (args.family, args.trainer_type, args.trainer_class, args.lora_rank, args.min_rank) == (
        "flux", "lora", "flux_lora", 16, 16)
    assert (args.optimizer, args.learning_rate, args.max_grad_norm, args.mixed_precision, args.checkpointing_steps,
            args.num_train_epochs, args.guidance_scale, args.max_sequence_length, args.placeholder_token,
            args.pretrained_vae_model_name_or_path) == ("prodigy", 1.0, 1.0, "bf16", 100, 1000, 1.0, 512, "sks", "none")
    args = parse_args(flux_args(tiny_flux, image_dir, tmp_path, "--mask_dir=None", "--optimizer", "AdamW"))
    assert (args.trainer_class, args.lora_rank, args.min_rank, args.num_train_epochs, args.train_data_dir) == (
        "flux_tlora", 4, 1, 2, str(image_dir))
    assert args.mask_dir is None and (args.optimizer, args.learning_rate) == ("adamw", 1e-4)  # not Prodigy's 1.0


def test_learning_rate_default_follows_the_optimizer(image_dir, tmp_path, capsys):
    assert parse_args(args_with(image_dir, tmp_path, "--optimizer", "prodigy")).learning_rate == 1.0
    assert parse_args(args_with(image_dir, tmp_path)).learning_rate == 1e-4
    assert parse_args(args_with(image_dir, tmp_path, "--learning_rate", "3e-4")).learning_rate == 3e-4
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "Default: 1e-4 with --optimizer adamw, 1.0 with --optimizer prodigy" in " ".join(capsys.readouterr().out.split())


def flux_train_args_min(tiny_flux, image_dir, tmp_path):
    return ["--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(image_dir),
            "--output_dir", str(tmp_path / "out"), "--class_name", "dog", "--resolution", "64"]


def test_flux_config_file_uses_the_authors_names(tiny_flux, image_dir, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "flux_tlora.yaml").read_text())
    config["pretrained_model_name_or_path"] = str(tiny_flux)
    (tmp_path / "flux.yaml").write_text(yaml.safe_dump(config))
    args = parse_args(["--config", str(tmp_path / "flux.yaml"), "--instance_data_dir", str(image_dir),
                       "--class_name", "dog", "--output_dir", str(tmp_path / "out")])
    assert (args.trainer_class, args.lora_rank, args.min_rank, args.gradient_checkpointing) == ("flux_tlora", 32, 1, True)


@pytest.mark.parametrize("extra, message", [
    (("--trainer_class", "sdxl_tlora"), "--trainer_class sdxl_tlora is for another model family; this is a flux "
                                        "model: pass --trainer_class flux_tlora"),
    (("--tlora", "--trainer_class", "flux_lora"), "--tlora asks for the timestep mask, but --trainer_class is flux_lora"),
    (("--resolution", "72"), "--resolution must be a multiple of 16 for flux, at least 64, got 72"),
    (("--max_sequence_length", "513"), "--max_sequence_length must be between 1 and 512"),
    (("--mask_dir", "/no/masks"), "--mask_dir: folder /no/masks does not exist"),
    (("--optimizer", "prodigy", "--use_8bit_adam"), "--use_8bit_adam is an AdamW option"),
    (("--rank", "8"), "--min_rank (16) must not exceed --lora_rank (8)"),
])
def test_flux_bad_input(tiny_flux, image_dir, tmp_path, capsys, extra, message):
    code, err = run_main(with_flags(flux_train_args_min(tiny_flux, image_dir, tmp_path), extra), capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert_helpful(err)


def test_missing_mask_and_flux_only_flags_on_sdxl(tiny_flux, image_dir, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "00.png")  # none for 01.jpg
    code, err = run_main(flux_train_args_min(tiny_flux, image_dir, tmp_path) + ["--mask_dir", str(masks)], capsys)
    assert code == 2 and "--mask_dir: no mask for 01.jpg in" in err
    code, err = run_main(args_with(image_dir, tmp_path, "--guidance_scale", "3.5"), capsys)
    assert code == 2 and "--guidance_scale is for FLUX models" in err


def test_unknown_pipeline_class_is_named(image_dir, tmp_path, capsys):
    code, err = run_main(train_args(index_only(tmp_path, "Flux2Pipeline"), image_dir, tmp_path / "out"), capsys)
    assert code == 2 and f"is a Flux2Pipeline; tlora trains {', '.join(sorted(families.PIPELINES))} models" in err
