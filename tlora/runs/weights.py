"""A checkpoint's weights file: `pytorch_lora_weights.safetensors` in the authors' key layout, written atomically,
and read back (its header, its tensors, the authors' FLUX `lora.pt`) without trusting it.

Keys: `<attention module path>.processor.to_{q,k,v,out}_lora.<param>` (FLUX's text stream:
`to_{q,k,v}_proj_lora`), float32. Our files also carry their settings as metadata (TLoRASettings.to_metadata),
so that they explain themselves. Working out a file's settings is `tlora.runs.reading`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from tlora.common.errors import CheckpointError, first_line
from tlora.common.files import atomic_write
from tlora.common.values import shown
from tlora.method.adapters import as_saved

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
AUTHORS_FLUX_NAME = "lora.pt"  # the authors' FLUX checkpoints: a pickled dict of tensors
WEIGHTS_NAMES = (WEIGHTS_NAME, AUTHORS_FLUX_NAME)  # what a checkpoint folder holds, in the order they are looked for


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (float32) with string metadata."""
    meta = {"format": "pt"}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    tensors = as_saved(state_dict)
    path = Path(folder) / WEIGHTS_NAME
    atomic_write(path, save(tensors, metadata=meta))
    return path


def save_pickle(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """The authors' FLUX lora.pt: torch.save of a plain dict of float32 tensors, written atomically."""
    buffer = io.BytesIO()
    torch.save(as_saved(tensors), buffer)
    atomic_write(path, buffer.getvalue())


# -- reading ---------------------------------------------------------------------------------------------------
DAMAGED = "copy it again or use another checkpoint"


def what_it_is(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    if path.is_dir():
        return "a folder"
    if path.is_symlink() and not path.exists():
        return "a link to nothing"
    return "not a regular file (a device, pipe or socket)"


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The authors' lora.pt: torch.load with weights_only (tensors and plain containers; never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged, or a pickle that holds more than tensors (torch's words would advise loading it)
        raise CheckpointError(f"{path} is not a readable tensor file: damaged, or a pickle holding more than tensors "
                              f"(never loaded: it could run code); {DAMAGED}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat dict of named tensors; pass a T-LoRA checkpoint")
    return state


# the floating point dtypes, by safetensors' names
FLOATS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def check_floating(path: Path, dtypes: dict[str, str]) -> None:
    """Every tensor floating point (dtypes by safetensors' names): one line naming the file and a tensor otherwise."""
    for key, dtype in dtypes.items():
        if dtype not in FLOATS.values():
            raise CheckpointError(f"{path}: tensor {shown(key)} is {dtype}, not floating point, so this is not a "
                                  f"T-LoRA checkpoint; {DAMAGED}")


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) from a file's header only (no tensor is read; a lora.pt is memory-mapped); every
    tensor must be floating point."""
    if path.suffix == ".pt":
        state = _read_pickle(path)
        check_floating(path, {k: FLOATS.get(v.dtype, str(v.dtype)) for k, v in state.items()})
        return {k: tuple(v.shape) for k, v in state.items()}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes, metadata = {k: s.get_dtype() for k, s in slices.items()}, f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise damaged(path, err) from None
    check_floating(path, dtypes)
    return shapes, metadata


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return {k: v.clone() for k, v in _read_pickle(path).items()}
    try:
        return load_file(str(path))
    except Exception as err:
        raise damaged(path, err) from None


def damaged(path: Path, err: Exception) -> CheckpointError:
    """The one line for a weights file safetensors cannot read (`err`: what it said)."""
    return CheckpointError(f"{path} is damaged (truncated or not a safetensors file: {first_line(err)}); {DAMAGED}")


def check_finite_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every value a finite number: a checkpoint holding NaN or inf is one line naming the file."""
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: tensor {shown(key)} holds NaN or inf values (a diverged run?); use an "
                                  "older checkpoint, or train again with a lower learning rate")
