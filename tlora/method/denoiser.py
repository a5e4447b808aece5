"""How the method is told about a denoiser, as peft is given target modules: which Linears to adapt (and which rows
of a fused one), which call argument carries the timestep and how its value maps to the paper's t, and how to tell
that an attention module computes its projections through a fused layer. A model family describes its denoiser
(families.base.Family.describe); the method knows no model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class Layer(NamedTuple):
    """One adapter: its checkpoint key prefix, the Linear it adapts (a module path), and which of that Linear's
    output rows (None: all; (start, stop): one projection inside a fused layer, e.g. FLUX.2's q, k, v in
    `to_qkv_mlp_proj`). path None marks an adapter the authors create (drawing random numbers) but never use."""

    prefix: str
    path: str | None
    rows: tuple[int, int] | None = None


def projections_fused(attention: nn.Module) -> bool:
    """diffusers' own flag for an attention module whose q, k, v run through one fused layer
    (fuse_qkv_projections), bypassing the separate projections the adapters are hooked on."""
    return bool(getattr(attention, "fused_projections", False))


@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser as the method sees it.

    layers:       every adapter, in the order its random start is drawn (the authors' creation order);
    timestep_arg: the denoiser's timestep argument: (keyword, position);
    paper_t:      the paper's t in [0, T) from the value the denoiser is called with (SDXL: itself; FLUX: t / 1000);
    fused:        whether an attention module's projections run through a fused layer, around the adapters;
    entries:      the module paths (from the root; "" is the root) whose forward calls carry the timestep: models
                  that a pipeline calls one at a time (Wan 2.2's two experts), each adapter under its own entry.
    """

    layers: tuple[Layer, ...]
    timestep_arg: tuple[str, int] = ("timestep", 1)
    paper_t: Callable[[torch.Tensor], torch.Tensor] = lambda timestep: timestep
    fused: Callable[[nn.Module], bool] = projections_fused
    entries: tuple[str, ...] = ("",)
