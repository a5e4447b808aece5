"""Models built empty (on the `meta` device: shapes, no memory, no weights) from their configs: the published
architectures each family ships by name (`Family.architectures`: `sdxl`, `flux-dev`, `klein-4b`, `qwen-image`,
...), or any local model folder's configs. Keys a family's config leaves out take the classes' defaults, which
are that model's values.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tlora.families.base import cast_as_loaded

CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              sample_size=1024, scaling_factor=0.13025, force_upcast=False)
FLOW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)



def published() -> dict[str, dict[str, Any]]:
    """Every family's published architectures: name -> {"family": its family, component -> (library, class,
    config)}."""
    from tlora.families import FAMILIES

    return {name: {"family": family.name, **spec} for family in FAMILIES.values()
            for name, spec in family.architectures.items()}


def family_of(name: str) -> str | None:
    """The family of a shipped architecture name (None: not one of them)."""
    return published().get(name, {}).get("family")


def _components_of_folder(folder: Path) -> dict[str, tuple[str, str, dict]]:
    """(library, class, config) of each model and scheduler of a local model folder (model_index.json)."""
    from tlora.families import model_index

    index = model_index(str(folder))
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        config = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if config.is_file():
            out[name] = (spec[0], spec[1], json.loads(config.read_text()))
    return out


def build_empty(library: str, cls_name: str, config: dict, dtype: torch.dtype) -> Any:
    """One component with its parameters on the `meta` device in `dtype` (a scheduler is built as it is)."""
    from accelerate import init_empty_weights

    module = __import__(library, fromlist=[cls_name])
    cls = getattr(module, cls_name)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if not (library == "transformers" or (hasattr(cls, "from_config") and issubclass(cls, nn.Module))):
        return cls.from_config(config)
    # on meta, buffers too: a table the class computes at init (SD3's 384 x 384 positions) is no work there, and
    # one left on the CPU would meet meta activations
    with init_empty_weights(), torch.device("meta"):
        model = cls(cls.config_class(**config)) if library == "transformers" else cls.from_config(config)
    cast_as_loaded(model, dtype)  # in `dtype` as from_pretrained(dtype=...) loads it (T5's wo stays fp32 in fp16)
    return model.requires_grad_(False).eval()


def empty_pipeline(name_or_folder: str, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> SimpleNamespace:
    """Every model of a pipeline on `meta` (the VAE in `vae_dtype` when given) and its scheduler, as attributes."""
    spec = published().get(name_or_folder)
    parts = {k: v for k, v in spec.items() if k != "family"} if spec else _components_of_folder(Path(name_or_folder))
    built = {}
    for name, (library, cls_name, config) in parts.items():
        if library not in ("diffusers", "transformers"):
            continue
        built[name] = build_empty(library, cls_name, config, vae_dtype if name == "vae" and vae_dtype else dtype)
    return SimpleNamespace(**built)
