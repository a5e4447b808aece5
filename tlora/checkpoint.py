"""Checkpoint files: `pytorch_lora_weights.safetensors` in the authors' key layout, written atomically.

Keys: `<attention module path>.processor.to_{q,k,v,out}_lora.<param>` (FLUX's text stream:
`to_{q,k,v}_proj_lora`), float32. Our files also carry metadata (trainer_type, ranks, family, ...) so that
they explain themselves; loading never needs it, because the authors' files carry only `format: pt`
(SDXL) or are pickles (`lora.pt`, FLUX), which are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .usage import UsageError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
AUTHORS_FLUX_NAME = "lora.pt"  # the authors' FLUX checkpoints: a pickled dict of tensors, read with weights_only
METADATA_KEYS = (
    "trainer_type", "trainer_class", "lora_rank", "min_rank", "alpha_rank_scale", "sig_type",
    "pretrained_model_name_or_path", "family",
)


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


def checkpoint_metadata(args, step: int) -> dict:
    """What our files say about themselves: the run's T-LoRA settings and step, plus the fields of the
    ComfyUI-T-LoRA node (max_rank, min_rank, alpha) under its own names."""
    meta = {k: getattr(args, k, None) for k in METADATA_KEYS} | {"global_step": step}
    return meta | {"max_rank": args.lora_rank, "alpha": args.alpha_rank_scale}


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
    if path.is_dir():
        path = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() or not (path / AUTHORS_FLUX_NAME).is_file() \
            else path / AUTHORS_FLUX_NAME
    if not path.is_file():
        raise CheckpointError(f"no T-LoRA weights at {path}; pass a checkpoint-N folder or its {WEIGHTS_NAME}")
    return path


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used here: damaged, or made for other settings."""


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The authors' lora.pt: torch.load with weights_only (tensors and plain containers; never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # damaged, or a pickle that holds more than tensors
        raise CheckpointError(f"{path} is not a readable tensor file ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat dict of named tensors; pass a T-LoRA checkpoint")
    return state


def read_header(checkpoint: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) of a checkpoint, from the file's header only (no tensor is read;
    a lora.pt is memory-mapped)."""
    path = weights_path(checkpoint)
    if path.suffix == ".pt":
        return {k: tuple(v.shape) for k, v in _read_pickle(path).items()}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{path} is damaged (truncated or not a safetensors file: {err})") from None


def read_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint folder or file."""
    path = weights_path(checkpoint)
    if path.suffix == ".pt":
        return {k: v.clone() for k, v in _read_pickle(path).items()}, {}
    _, metadata = read_header(path)
    try:
        return load_file(str(path)), metadata
    except Exception as err:
        raise CheckpointError(f"{path} is damaged (truncated or not a safetensors file: {err})") from None


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


LYCORIS_REFUSAL = (
    "is a LyCORIS (SimpleTuner) T-LoRA file: load it with tlora.load(pipe, file) (it needs the base model, "
    "from whose weights LyCORIS rebuilds the frozen start); exports, inference.py and analyze take tlora's "
    "or the authors' checkpoints"
)


def infer_trainer_type(shapes: dict) -> str:
    """`ortho_lora` or `lora`, read off the parameter names (of tensors or of a header's shapes)."""
    if any(k.startswith("lycoris_") for k in shapes):
        raise CheckpointError(f"this checkpoint {LYCORIS_REFUSAL}")
    if any(k.endswith(".q_layer.weight") for k in shapes):
        return "ortho_lora"
    if any(k.endswith(".down.weight") for k in shapes):
        return "lora"
    raise CheckpointError("not a T-LoRA checkpoint: it has neither q_layer nor down weights")


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def infer_rank(shapes: dict) -> int:
    """The largest adapter rank in the file (= lora_rank)."""
    return max(_shape(v)[0] for k, v in shapes.items() if k.endswith((".q_layer.weight", ".down.weight")))


def layer_ranks(shapes: dict) -> dict[str, tuple[int, int, int]]:
    """Adapter prefix -> (rank, in_features, out_features), read off the down/q and up/p shapes."""
    out = {}
    for key, shape in shapes.items():
        for down, up in ((".down.weight", ".up.weight"), (".q_layer.weight", ".p_layer.weight")):
            if key.endswith(down) and key[: -len(down)] + up in shapes:
                prefix = key[: -len(down)]
                rank, in_features = _shape(shape)
                out[prefix] = (rank, in_features, _shape(shapes[prefix + up])[0])
    return out


def check_made_with(shapes: dict, trainer_type: str, lora_rank: int, where: str = "checkpoint") -> None:
    """Fail in one line when a checkpoint was not made with `trainer_type` and `lora_rank`."""
    found_type, found_rank = infer_trainer_type(shapes), infer_rank(shapes)
    ranks = layer_ranks(shapes)
    if found_type != trainer_type or any(r != min(lora_rank, i, o) for r, i, o in ranks.values()):
        raise CheckpointError(
            f"{where}: this is a {found_type} checkpoint, rank {found_rank}, but the settings say "
            f"trainer_type {trainer_type}, lora_rank {lora_rank}; use the hparams.yml of the run that wrote it"
        )
