"""Plain helpers the test modules share (conftest.py keeps the fixtures): paths, command lines, checkpoints,
denoiser inputs of each tiny family, copies of runs, and a trace of the files a command opens."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


# -- files --------------------------------------------------------------------------------------------------------
def read_weights(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint folder or file, through tlora's reader (no settings needed)."""
    from tlora.runs.run_folder import find_weights
    from tlora.runs.weights import read_header, read_tensors

    found = find_weights(path)
    return read_tensors(found), read_header(found)[1]


def make_image(path: Path, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """A random RGB image (not square, so cropping is exercised)."""
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return path


def copy_run(run: Path, tmp_path: Path, ignore: tuple[str, ...] = ("samples", "analysis")) -> Path:
    """A copy of a (shared, read-only) trained run at tmp_path/copies/<its name>, alone in its folder, to change
    or resume; its hparams.yml still names the original as output_dir. Samples and analysis are left out."""
    return Path(shutil.copytree(run, tmp_path / "copies" / run.name, ignore=shutil.ignore_patterns(*ignore)))


# -- command lines ------------------------------------------------------------------------------------------------
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


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A train.py command line for the tiny SDXL at 64 px."""
    return with_flags([
        "--trainer_type", "ortho_lora", "--trainer_class", "sdxl_tlora",
        "--pretrained_model_name_or_path", str(model), "--pretrained_vae_model_name_or_path", "none",
        "--train_data_dir", str(data), "--output_dir", str(out), "--class_name", "dog",
        "--placeholder_token", "sks", "--resolution", "64", "--num_train_epochs", "3",
        "--checkpointing_steps", "2", "--lora_rank", "4", "--min_rank", "2", "--dataloader_num_workers", "0",
    ], extra)


def flux_train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The authors' FLUX command line (run.py -> train.py) for the tiny FLUX (or klein) at 64 px."""
    return with_flags([
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--output_dir", str(out),
        "--class_name", "dog", "--rank", "4", "--min_rank", "1", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--resolution", "64", "--max_sequence_length", "16", "--seed", "0",
        "--dataloader_num_workers", "0",
    ], extra) + ["--tlora"]


# -- denoiser inputs of the tiny models (all but the timestep) and adapters as if trained ---------------------------
def sdxl_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, cross = unet.config.sample_size, unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {"sample": torch.randn(batch, 4, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}}


def sd15_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, cross = unet.config.sample_size, unet.config.cross_attention_dim
    return {"sample": torch.randn(batch, 4, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g)}


def flux_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g), "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(5, 3), "guidance": torch.ones(batch)}


def klein_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, transformer.config.joint_attention_dim, generator=g),
            "img_ids": ids.expand(batch, -1, -1), "txt_ids": text_ids.expand(batch, -1, -1)}


def chroma_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """As ChromaPipeline calls the transformer: the text mask (the last text token padding) with the image tokens
    appended, as floats."""
    g = torch.Generator().manual_seed(seed)
    text = torch.tensor([1.0, 1, 1, 1, 0]).expand(batch, -1)
    return {"hidden_states": torch.randn(batch, 16, 64, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, transformer.config.joint_attention_dim, generator=g),
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3),
            "attention_mask": torch.cat([text, torch.ones(batch, 16)], 1)}


def wan_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """As WanPipeline calls the transformer: 5-D latents (b, c, frames, h, w), UMT5 embeddings."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, transformer.config.in_channels, 2, 4, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, transformer.config.text_dim, generator=g)}


def sd3_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """As StableDiffusion3Pipeline calls the transformer: 4-D latents (the transformer patches them), the prompt's
    embeddings and the pooled CLIP projections."""
    g = torch.Generator().manual_seed(seed)
    c, side = transformer.config, transformer.config.sample_size
    return {"hidden_states": torch.randn(batch, c.in_channels, side, side, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, c.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g)}


def zimage_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """As ZImagePipeline calls the transformer: one latent per sample with a frame dimension (c, 1, h, w) and one
    prompt embedding per sample, of its own length (the timestep is `t`)."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return {"x": [torch.randn(c.in_channels, 1, 8, 8, generator=g) for _ in range(batch)],
            "cap_feats": [torch.randn(5 + 2 * i, c.cap_feat_dim, generator=g) for i in range(batch)]}


def qwen_image_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """As QwenImagePipeline calls the transformer: packed 2x2 latent patches of a 4 x 4 grid, Qwen2.5-VL embeddings
    (no mask: no prompt padded) and the image shapes for RoPE."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return {"hidden_states": torch.randn(batch, 16, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, c.joint_attention_dim, generator=g),
            "img_shapes": [[(1, 4, 4)]] * batch}


def tlora_and_export_outputs(pipe, checkpoint, export: Path, call: Callable[[], torch.Tensor], **load_kwargs
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expected, got, base): `call()` (the denoiser on fixed inputs) with the T-LoRA (tlora.load), with the exported
    file loaded by the pipeline's own load_lora_weights, and with neither; the pipeline is left as it was."""
    import tlora

    tlora.load(pipe, checkpoint)
    with torch.no_grad():
        expected = call()
    tlora.unload(pipe)
    pipe.load_lora_weights(str(export), adapter_name="export", **load_kwargs)
    try:
        with torch.no_grad():
            got = call()
            pipe.disable_lora()
            base = call()
    finally:
        pipe.unload_lora_weights()  # the peft layers too: the pipeline as it was
    return expected, got, base


def left_as_found(pipe) -> None:
    """Take off a shared pipeline what a test put on it: diffusers LoRAs (unfused first) and the T-LoRA."""
    import tlora
    from tlora.families import denoiser

    model = denoiser(pipe)
    if getattr(model, "peft_config", None):
        if any(getattr(module, "merged", False) for module in model.modules()):
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
    if tlora.attached(model) is not None:
        tlora.unload(model)


def perturb(tlora, seed: int = 0) -> None:
    """Move every trainable adapter weight off its start, as training would (the update is no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tlora.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


# -- every path a command opens, traced with an audit hook (hooks cannot be removed: it records only while on) --
_OPENED: list[str] | None = None
_EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir")


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextmanager
def opened() -> Iterator[list[str]]:
    """The absolute paths opened (files and folders listed or made) inside the block, safetensors' reads included
    (they happen in Rust, with no audit event: tlora's readers are wrapped to record them)."""
    import tlora.runs.checkpoint_state
    import tlora.runs.weights

    global _OPENED
    _OPENED = []

    def recorded(read):
        def wrapper(path, *args, **kwargs):
            _OPENED.append(os.path.abspath(os.fsdecode(path)))
            return read(path, *args, **kwargs)
        return wrapper

    with ExitStack() as patches:
        for module in (tlora.runs.weights, tlora.runs.checkpoint_state):
            for name in ("safe_open", "load_file"):
                if hasattr(module, name):
                    patches.enter_context(patch.object(module, name, recorded(getattr(module, name))))
        try:
            yield _OPENED
        finally:
            _OPENED = None


def under(paths: list[str], folder: Path) -> list[str]:
    """The paths in `paths` inside `folder`."""
    return [p for p in paths if Path(p).is_relative_to(folder.resolve()) or Path(p).is_relative_to(folder)]
