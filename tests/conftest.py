"""Shared fixtures: a tiny random SDXL on disk, generated training images, offline settings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def read_weights(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint folder or file, through tlora's reader (no settings needed)."""
    from tlora.runs.run_folder import find_weights
    from tlora.runs.weights import read_header, read_tensors

    found = find_weights(path)
    return read_tensors(found), read_header(found)[1]


# A one-line error names what is wrong (a --flag, a file or folder, the manifest) and says the fix: a clause that
# starts with an imperative verb (after the start, `;`, `:`, `,`, `(`, or `or`/`and`/`then`/`else`) and names the
# flag, file, value or command to use. "must", "check" and a bare "set" or "run" are no fix.
NAMES = re.compile(r"--\w|/|\w\.\w{2,}|manifest|tlora\.load")
FIX_VERBS = (r"pass|add|drop|remove|use|start|resume|install|fix|delete|free|lower|raise|replace|download|wait|"
             r"choose|give|write|call|load|rename|save|include|shorten|copy|move|make|train|export|re-export|keep|"
             r"retry|update|convert|upgrade|set(?= --| \w+=)|run(?= the| it| again| python| tlora| \w+\.py| `)")
FIX = re.compile(rf"(?:^|[;:,(]|\b(?:or|and|then|else)\b)\s*(?:{FIX_VERBS})\b(?P<rest>[^;]*)")
OBJECT = re.compile(r"--\w|/|\w\.\w{2,}|\w=|\w\(\)|\d|'[^']+'|`[^`]+`|\b(a|an|the|it|them|one|another|some|"
                    r"again|first|once|more|fewer|less)\b")


# An internal exception's class name (KeyError, UnicodeDecodeError, SafetensorError, ...) or a traceback means a
# failure nobody turned into words for the user.
INTERNAL = re.compile(r"\b[A-Z]\w*(Error|Exception|Exit|Interrupt)\b|Traceback|traceback in")


def fix_clause(line: str) -> str | None:
    """The first clause of `line` that says what to do: an imperative verb with an object (a flag, a file, a value,
    a command, "a new run", "again")."""
    for found in FIX.finditer(line.removeprefix("error: ")):
        if OBJECT.search(found.group("rest")):
            return found.group(0).strip(" ;:,(")
    return None


def assert_helpful(line: str) -> None:
    """`line` is one line that names the flag or file and says the fix, in words (no exception class names)."""
    assert line.count("\n") <= 1 and NAMES.search(line) and fix_clause(line), f"not a helpful error: {line!r}"
    assert not INTERNAL.search(line), f"an internal error reached the user: {line!r}"


def one_line_error(capsys, code: int, message: str, exit_code: int = 2) -> str:
    """The command failed with `exit_code` and one helpful `error:` line that contains `message`: all it printed
    for bad input (exit 2, before anything loads); its last line, after the progress, for a run that failed."""
    err = capsys.readouterr().err
    assert code == exit_code, err
    if exit_code != 2:
        lines = err.splitlines()
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
        err = lines[-1] + "\n"
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert_helpful(err)
    return err


def make_image(path: Path, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """A random RGB image (not square, so cropping is exercised)."""
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tlora.families.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("concept")
    make_image(folder / "00.png", seed=0)
    make_image(folder / "01.jpg", size=(70, 90), seed=1)
    return folder


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("class_images")
    for i in range(3):
        make_image(folder / f"{i}.png", seed=10 + i)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from tlora.families.pipelines import load_pipeline

    return load_pipeline(str(tiny_model), "none")


@pytest.fixture
def unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").requires_grad_(False)


def with_flags(base: list[str], extra: tuple[str, ...]) -> list[str]:
    """`base` (flag-value pairs) with `extra`'s values in place of its own for the flags both give, and `extra`'s
    other arguments after it: the command lines refuse a flag given twice with two values."""
    values = dict(zip(base[::2], base[1::2]))
    rest, i = [], 0
    while i < len(extra):
        if extra[i] in values and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            values[extra[i]] = extra[i + 1]
            i += 2
        else:
            rest.append(extra[i])
            i += 1
    return [item for pair in values.items() for item in pair] + rest


def train_args(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A train.py command line for the tiny model at 64 px."""
    return with_flags([
        "--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora",
        "--pretrained_model_name_or_path", str(tiny_model), "--pretrained_vae_model_name_or_path", "none",
        "--train_data_dir", str(data), "--output_dir", str(out), "--class_name", "dog",
        "--placeholder_token", "sks", "--resolution", "64", "--num_train_epochs", "3",
        "--checkpointing_steps", "2", "--lora_rank", "4", "--min_rank", "2", "--dataloader_num_workers", "0",
    ], extra)


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    """Tiny random CLIP (root/clip) and DINO ViT (root/dino) models with their processors, saved to disk."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from tlora.families.tiny import write_tokenizer

    root = tmp_path_factory.mktemp("embedders")
    __import__("torch").manual_seed(0)
    write_tokenizer(root / "tok")
    tokenizer = CLIPTokenizer(str(root / "tok/vocab.json"), str(root / "tok/merges.txt"), model_max_length=77)
    n = len(tokenizer)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root


@pytest.fixture(scope="session")
def tiny_embedders(tiny_embedder_dir):
    """The tiny models, loaded as the metrics code loads them."""
    from tlora.evaluation.metrics import Embedders

    return Embedders.load(str(tiny_embedder_dir / "clip"), str(tiny_embedder_dir / "dino"), "cpu")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from tlora.families.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux):
    from tlora.families.pipelines import load_pipeline

    return load_pipeline(str(tiny_flux), "none")


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> Path:
    from tlora.families.tiny import build_tiny_klein

    return build_tiny_klein(tmp_path_factory.mktemp("tiny-klein"))


@pytest.fixture(scope="session")
def klein_pipe(tiny_klein):
    from tlora.families.pipelines import load_pipeline

    return load_pipeline(str(tiny_klein), "none")


def flux_train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The authors' FLUX command line (run.py -> train.py) for the tiny FLUX at 64 px."""
    return with_flags([
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--output_dir", str(out),
        "--class_name", "dog", "--rank", "4", "--min_rank", "1", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--resolution", "64", "--max_sequence_length", "16", "--seed", "0",
        "--dataloader_num_workers", "0",
    ], extra) + ["--tlora"]
