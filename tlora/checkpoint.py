"""Writing checkpoint files: `pytorch_lora_weights.safetensors` in the authors' key layout, written atomically.

Keys: `<attention module path>.processor.to_{q,k,v,out}_lora.<param>` (FLUX's text stream:
`to_{q,k,v}_proj_lora`), float32. Our files also carry their settings as metadata (TLoRASettings.to_metadata),
so that they explain themselves. Reading any T-LoRA file (ours, the authors', LyCORIS's) is `tlora.reading`.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

from .usage import UsageError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
AUTHORS_FLUX_NAME = "lora.pt"  # the authors' FLUX checkpoints: a pickled dict of tensors
WEIGHTS_NAMES = (WEIGHTS_NAME, AUTHORS_FLUX_NAME)  # what a checkpoint folder holds, in the order they are looked for


def file_mode() -> int:
    """The mode a plainly created file gets under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: a crash never leaves half a file.
    The file gets the umask's mode, as open() would give it (mkstemp alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
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


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used here: damaged, or made for other settings."""


def save_pickle(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """The authors' FLUX lora.pt: torch.save of a plain dict of float32 tensors, written atomically."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, buffer)
    atomic_write(path, buffer.getvalue())


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
