"""Shared fixtures (plain helpers are in helpers.py): a tiny random model of each family on disk and its pipeline,
loaded once; trained runs, each trained once; generated training images; tiny CLIP and DINO; offline settings."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import left_as_found, make_image, train_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread, here and in the processes the tests start: the tiny models gain nothing from more, and on a shared
# 2-core machine two threads spin against each other (the fast tests took 90-160 s with two, 18-22 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 1))  # OpenMP also takes "4,2" (nested)


# A one-line error names what is wrong (a --flag, a file or folder, the manifest) and says the fix: a clause that
# starts with an imperative verb (after the start, `;`, `:`, `,`, `(`, or `or`/`and`/`then`/`else`) and goes on with
# what to do it with: a flag, a path, a quoted or code-like value (x.py, checkpoint-4, unload(), 0.95, None), a
# value such as auto or cpu, or a noun phrase that starts with an article or a pronoun ("a new run", "the file", "it
# again", "one of them"), maybe after a preposition ("with --x", "for it to end") or a second verb ("remove or
# replace it"). So a verb used as a noun ("load error", "copy failed", "use of", "train loss is NaN"), a verb with
# no object ("give up", "keep in mind") and "must", "check", "needs", a bare "set" or "run" are no fix.
NAMES = re.compile(r"--\w|/|\w\.[A-Za-z]\w+|manifest|tlora\.load")  # a file name's extension starts with a letter
FIX_VERBS = (r"pass|add|drop|remove|use|start|resume|install|pip install|fix|delete|free|lower|raise|replace|download|"
             r"wait|choose|give|write|call|load|rename|save|include|shorten|copy|move|make|train|export|re-export|keep|"
             r"retry|update|convert|upgrade|set(?= --| \w+=)|run(?= the| it| again| with| python| tlora| \w+\.py| `)")
FIX = re.compile(rf"(?:^|[;:,(]|\b(?:or|and|then|else)\b)\s*(?P<verb>{FIX_VERBS})\b(?=(?P<rest>[^;]*))")
STARTS = (r"a|an|the|it|its|them|their|this|that|these|those|one|another|other|some|all|each|every|both|any|more|"
          r"fewer|less|no|your|at least|at most|again")  # the words a noun phrase (or "it again") starts with
VALUES = r"auto|cpu|cuda|mps|none|latest|full"  # a value said as a bare word
THING = rf"(?:--?[\w{{]|[/~.'\"`{{(\[<\d]|[\w-]*[\d=.(:/_]|[A-Z]\w*|(?:{STARTS}|{VALUES})\b)"
PREPOSITIONS = r"with|for|from|to|into|in|on|under|as|by|after|until|out of"
OBJECT = re.compile(rf"\s+(?:(?:{PREPOSITIONS})\s+)?{THING}")  # the verb is followed by what to pass, use, run...


# An internal exception's class name (KeyError, UnicodeDecodeError, SafetensorError, ...) or a traceback means a
# failure nobody turned into words for the user.
INTERNAL = re.compile(r"\b[A-Z]\w*(Error|Exception|Exit|Interrupt)\b|Traceback|traceback in")


def fix_clause(line: str) -> str | None:
    """The first clause of `line` that says what to do: an imperative verb with an object (a flag, a file, a value,
    a command, "a new run", "again")."""
    for found in FIX.finditer(line.removeprefix("error: ")):
        rest = found.group("rest")
        if OBJECT.match(rest) or (found.group("verb") == "pip install" and rest.strip()):  # any package name
            return (found.group(0) + rest).strip(" ;:,(")
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


# -- each family's tiny model: tiny_<family> (its folder), <family>_pipe (loaded once, shared by the session),
# borrowed_<family>_pipe (the shared one for a test that puts adapters or LoRAs on it: taken off when it ends), and
# wide_<family> / wide_<family>_pipe (the same family built with other widths and head counts) ---------------------
def _tiny_families() -> tuple[str, ...]:
    from tlora.families.tiny_models import BUILDERS  # imported here: after the settings above, as diffusers reads them
    return tuple(BUILDERS)


TINY_FAMILIES = _tiny_families()  # sdxl, flux, klein


def _family_fixtures(family: str) -> None:
    def folder(tmp_path_factory) -> Path:
        from tlora.families.tiny_models import BUILDERS

        return BUILDERS[family](tmp_path_factory.mktemp(f"tiny-{family}"))

    def pipe(request):
        from tlora.families.pipelines import load_pipeline

        return load_pipeline(str(request.getfixturevalue(f"tiny_{family}")), "none")

    def borrowed(request):
        shared = request.getfixturevalue(f"{family}_pipe")
        yield shared
        left_as_found(shared)

    def wide_folder(tmp_path_factory) -> Path:
        from tlora.families.tiny_models import BUILDERS

        return BUILDERS[family](tmp_path_factory.mktemp(f"wide-{family}"), wide=True)

    def wide_pipe(request):
        from tlora.families.pipelines import load_pipeline

        return load_pipeline(str(request.getfixturevalue(f"wide_{family}")), "none")

    globals()[f"tiny_{family}"] = pytest.fixture(scope="session", name=f"tiny_{family}")(folder)
    globals()[f"{family}_pipe"] = pytest.fixture(scope="session", name=f"{family}_pipe")(pipe)
    globals()[f"borrowed_{family}_pipe"] = pytest.fixture(name=f"borrowed_{family}_pipe")(borrowed)
    globals()[f"wide_{family}"] = pytest.fixture(scope="session", name=f"wide_{family}")(wide_folder)
    globals()[f"wide_{family}_pipe"] = pytest.fixture(scope="session", name=f"wide_{family}_pipe")(wide_pipe)


for _family in TINY_FAMILIES:
    _family_fixtures(_family)


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    """Each tiny family's name in turn (a test taking it runs once per family)."""
    return request.param


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


@pytest.fixture
def unet(borrowed_sdxl_pipe):
    """The session's tiny SDXL UNet (frozen), for a test that attaches adapters to it: unloaded when it ends."""
    return borrowed_sdxl_pipe.unet


@pytest.fixture(scope="session")
def trained_run(tiny_sdxl, image_dir, tmp_path_factory) -> Callable[..., Path]:
    """trained_run(**flags) -> the folder of a tiny SDXL run trained with train_args and these train.py flags
    (`num_train_epochs=4` -> --num_train_epochs 4; True -> the bare flag), trained once per distinct set of flags
    and shared by every module that asks for it: read it, or change a copy (helpers.copy_run)."""
    from tlora.train.options import parse_args
    from tlora.train.trainer import train

    runs: dict[tuple, Path] = {}

    def run(**flags) -> Path:
        key = tuple(sorted((name, str(value)) for name, value in flags.items()))
        if key not in runs:
            extra = [item for name, value in key
                     for item in ((f"--{name}",) if value == "True" else (f"--{name}", value))]
            runs[key] = train(parse_args(train_args(tiny_sdxl, image_dir, tmp_path_factory.mktemp("run"), *extra)))
        return runs[key]

    return run


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

    from tlora.families.tiny_parts import write_tokenizer

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
