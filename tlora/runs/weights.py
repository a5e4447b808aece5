"""Writing checkpoint files: `pytorch_lora_weights.safetensors` in the authors' key layout, written atomically.

Keys: `<attention module path>.processor.to_{q,k,v,out}_lora.<param>` (FLUX's text stream:
`to_{q,k,v}_proj_lora`), float32. Our files also carry their settings as metadata (TLoRASettings.to_metadata),
so that they explain themselves. Reading any T-LoRA file (ours, the authors', LyCORIS's) is `tlora.runs.reading`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save

from tlora.common.files import atomic_write

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
AUTHORS_FLUX_NAME = "lora.pt"  # the authors' FLUX checkpoints: a pickled dict of tensors
WEIGHTS_NAMES = (WEIGHTS_NAME, AUTHORS_FLUX_NAME)  # what a checkpoint folder holds, in the order they are looked for


def save_weights(state_dict: dict[str, torch.Tensor], folder: str | Path, metadata: dict | None = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (float32) with string metadata."""
    meta = {"format": "pt"}
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    path = Path(folder) / WEIGHTS_NAME
    atomic_write(path, save(tensors, metadata=meta))
    return path


def save_pickle(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """The authors' FLUX lora.pt: torch.save of a plain dict of float32 tensors, written atomically."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, buffer)
    atomic_write(path, buffer.getvalue())


