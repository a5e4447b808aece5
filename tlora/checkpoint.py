"""Checkpoint files: `pytorch_lora_weights.safetensors` in the authors' key layout, written atomically.

Keys: `<attention module path>.processor.to_{q,k,v,out}_lora.<param>`, float32. Our files also carry
metadata (trainer_type, ranks, ...) so that they explain themselves; loading never needs it, because the
authors' files carry only `format: pt`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEYS = (
    "trainer_type", "trainer_class", "lora_rank", "min_rank", "alpha_rank_scale", "sig_type",
    "pretrained_model_name_or_path",
)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (float32) with string metadata."""
    meta = {"format": "pt"}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    path = Path(folder) / WEIGHTS_NAME
    atomic_write(path, save(tensors, metadata=meta))
    return path


def weights_path(checkpoint: str | Path) -> Path:
    """The weights file of a checkpoint folder, or the file itself."""
    path = Path(checkpoint)
    path = path / WEIGHTS_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no T-LoRA weights at {path}")
    return path


def read_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint folder or file."""
    path = weights_path(checkpoint)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor]) -> None:
    """Raise naming the first expected key that is missing or has another shape, or the first extra key."""
    for key, shape in expected.items():
        if key not in found:
            raise KeyError(f"checkpoint has no tensor {key!r} (expected shape {tuple(shape)})")
        if found[key].shape != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(found[key].shape)}, expected {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise KeyError(f"checkpoint has a tensor {extra[0]!r} that this model has no place for")


def infer_trainer_type(state_dict: dict[str, torch.Tensor]) -> str:
    """`ortho_lora` or `lora`, read off the parameter names."""
    if any(k.endswith(".q_layer.weight") for k in state_dict):
        return "ortho_lora"
    if any(k.endswith(".down.weight") for k in state_dict):
        return "lora"
    raise ValueError("not a T-LoRA checkpoint: it has neither q_layer nor down weights")


def infer_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """The largest adapter rank in the file (= lora_rank)."""
    return max(v.shape[0] for k, v in state_dict.items() if k.endswith((".q_layer.weight", ".down.weight")))
