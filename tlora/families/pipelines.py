"""Loading a model family's pipeline with diffusers' own classes, and moving its encoders around."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from tlora import families
from tlora.families.base import moved

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# --base_model_precision: a quantized, frozen denoiser (diffusers' bitsandbytes and torchao backends)
BASE_PRECISIONS = ("auto", "int8-bnb", "nf4-bnb", "int8-torchao", "fp8-torchao")


def _quant_config(precision: str, dtype: torch.dtype) -> Any:
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if precision == "int8-bnb":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "nf4-bnb":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8WeightOnlyConfig())


def quantization(precision: str, family: type[families.Family], dtype: torch.dtype) -> Any:
    """diffusers' PipelineQuantizationConfig for the denoiser only (None for 'auto': no quantization)."""
    if precision in (None, "auto"):
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={family.model_attr: _quant_config(precision, dtype)})


def load_pipeline(
    model: str, vae: str | None, revision: str | None = None, dtype: torch.dtype = torch.float32,
    family: type[families.Family] | None = None, base_model_precision: str = "auto",
):
    """The `family`'s pipeline (detected from model_index.json unless given), frozen, every part in `dtype`."""
    fam = family or families.get(families.detect(model, revision))
    return fam.load_pipeline(model, vae, revision, dtype, quantization(base_model_precision, fam, dtype))


def offload_encoders(family, pipe) -> None:
    """Move the encoders (those of the pipeline's `family`) to the CPU (a no-op there) once everything they encode
    is cached."""
    for part in family.encoders(pipe):
        if part is not None:
            part.to("cpu")


@contextmanager
def encoders_on(family, pipe, device: torch.device):
    """Bring the encoders (those of the pipeline's `family`) to `device` for a while (validation), then back where
    they were."""
    with moved(family.encoders(pipe), device):
        yield
