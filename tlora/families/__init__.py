"""Model families: what differs between one model family and another (see base.Family; the list is FAMILIES);
everything else is shared."""

from __future__ import annotations

from typing import Any

from torch import nn

from tlora.common.errors import UsageError, first_line
from tlora.common.messages import DIFFUSERS_LAYOUT, HUB_FIX
from tlora.common.values import shown
from tlora.families.base import Family
from tlora.families.chroma import Chroma
from tlora.families.flux import FLUX
from tlora.families.klein import Klein
from tlora.families.qwen_image import QwenImage
from tlora.families.sd3 import SD3
from tlora.families.sd15 import SD15
from tlora.families.sdxl import SDXL
from tlora.families.wan import Wan
from tlora.families.zimage import ZImage

FAMILIES: dict[str, type[Family]] = {family.name: family for family in (SDXL, FLUX, Klein, Chroma, SD15, Wan, SD3,
                                                                         ZImage, QwenImage)}
# model_index.json _class_name -> family
PIPELINES = {pipeline: family.name for family in FAMILIES.values() for pipeline in family.pipelines}


def get(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise UsageError(f"model family must be one of {', '.join(FAMILIES)}, got {name!r}; pass one of them")
    return FAMILIES[name]


def of_model(pipe_or_model: Any) -> type[Family]:
    """The family of a pipeline or of a bare denoiser (UNet / transformer)."""
    for family in FAMILIES.values():
        if family.owns(family.model(pipe_or_model)):
            return family
    raise ValueError(f"{type(pipe_or_model).__name__} is not a pipeline or denoiser of a supported family "
                     f"({', '.join(FAMILIES)})")


def of_keys(keys) -> list[str]:
    """The families whose denoiser a checkpoint's keys may name: those with a layer the other owners lack when the
    keys name one (FLUX.1 and Chroma share their single blocks' q, k, v, which FLUX.2 fuses), else every owner
    (FLUX.1, FLUX.2 and Chroma share their double blocks' names); empty when no family owns them all."""
    keys = list(keys)
    owners = [name for name, family in FAMILIES.items() if keys and all(family.owns_key(k) for k in keys)]
    distinct = [name for name in owners if any(FAMILIES[name].distinct_key(k) for k in keys)]
    return distinct or owners


def known_from_keys(keys) -> str | None:
    """The family the keys name for sure: the only one owning them, or the only one with a layer of its own."""
    keys = list(keys)
    owners = of_keys(keys)
    distinct = [name for name in owners if any(FAMILIES[name].distinct_key(k) for k in keys)]
    return owners[0] if len(owners) == 1 else distinct[0] if len(distinct) == 1 else None


def attach(pipe_or_model: Any, settings, init: bool = True, svd_device=None):
    """A fresh T-LoRA on a pipeline's denoiser (or the denoiser itself), of whichever family it is (tlora.attach)."""
    return of_model(pipe_or_model).attach(pipe_or_model, settings, init, svd_device)


def denoiser(pipe_or_model: Any) -> nn.Module:
    """The UNet or transformer of a pipeline (or the denoiser itself)."""
    return of_model(pipe_or_model).model(pipe_or_model)


def model_index(model: str, revision: str | None = None) -> dict:
    """A model's model_index.json: from a local folder, else from the hub (or its cache when offline)."""
    from pathlib import Path

    path = Path(model).expanduser() / "model_index.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "model_index.json", revision=revision))
        except Exception as err:  # offline and not cached, no access, no such repository
            raise UsageError(f"--pretrained_model_name_or_path: cannot read {model}'s model_index.json "
                             f"({first_line(err)}); {HUB_FIX}")
    from tlora.common.text_files import read_json

    return read_json(path, "--pretrained_model_name_or_path", DIFFUSERS_LAYOUT)


def detect(model: str, revision: str | None = None) -> str:
    """The family of a model folder or hub id, from its pipeline class in model_index.json."""
    cls = model_index(model, revision).get("_class_name", "")
    if isinstance(cls, str) and cls in PIPELINES:
        return PIPELINES[cls]
    name = (cls if isinstance(cls, str) and len(cls) < 100 else shown(cls)) or "model of unknown class"
    raise UsageError(f"--pretrained_model_name_or_path: {model} is a {name}; "
                     f"tlora trains {', '.join(sorted(PIPELINES))} models: pass one of them")
