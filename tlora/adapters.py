"""All of T-LoRA's math: the timestep rank schedule, its mask, and the two adapter layers.

Rank schedule (paper, Eq. 6):  r(t) = int(((T - t) / T) ** alpha * (r_max - r_min)) + r_min
Vanilla T-LoRA (``lora``):      delta(x) = B (M_t * (A x)),                A ~ N(0, 1/r), B = 0
T-LoRA (``ortho_lora``):        delta(x) = P (M_t * L * (Q x)) - P0 (M_t * L0 * (Q0 x))

P, L, Q start from the SVD of a random N(0, std 1/r) matrix; P0, L0, Q0 are frozen copies of that start,
so delta is exactly zero before the first optimizer step. Parameter names match the authors' checkpoints.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

TRAINER_TYPES = ("lora", "ortho_lora")
# <family>_tlora: the timestep rank mask; <family>_lora: no mask (plain LoRA / Ortho-LoRA baselines)
TRAINER_CLASSES = ("sdxl_lora", "sdxl_tlora", "flux_lora", "flux_tlora")
SIG_TYPES = ("principal", "last", "middle")


def timestep_dependent(trainer_class: str) -> bool:
    """Whether a trainer class masks the rank by timestep (sdxl_tlora, flux_tlora)."""
    return trainer_class.endswith("_tlora")


def active_rank(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0
) -> torch.Tensor:
    """r(t) for each timestep, computed in float32 as the authors' code does (int64 result)."""
    t = torch.as_tensor(timesteps).to(torch.float32)
    frac = ((num_train_timesteps - t) / num_train_timesteps) ** alpha
    return (frac * (max_rank - min_rank)).to(torch.int64) + min_rank


def rank_mask(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0
) -> torch.Tensor:
    """0/1 float mask of shape (N, max_rank): row i keeps the first r(t_i) rank components."""
    ranks = active_rank(timesteps, num_train_timesteps, max_rank, min_rank, alpha).reshape(-1, 1)
    positions = torch.arange(max_rank, device=ranks.device).reshape(1, -1)
    return (positions < ranks).to(torch.float32)


def _scale_rank(h: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply the rank dimension (last) of h by a per-sample scale of shape (N or 1, rank)."""
    if scale is None:
        return h
    scale = scale.to(device=h.device, dtype=h.dtype)
    if scale.shape[0] not in (1, h.shape[0]):
        raise ValueError(f"T-LoRA mask has {scale.shape[0]} rows but the layer input has batch {h.shape[0]}")
    return h * scale.reshape(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])


class LoRAAdapter(nn.Module):
    """Vanilla T-LoRA: up(down(x) * mask). Keys: ``down.weight`` (r x in), ``up.weight`` (out x r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, init: bool = True) -> None:
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        if init:
            nn.init.normal_(self.down.weight, std=1 / rank)
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.down(x.to(self.down.weight.dtype))
        return self.up(_scale_rank(h, None if mask is None else mask[:, : self.rank])).to(x.dtype)


def _svd_slice(size: int, rank: int, sig_type: str) -> slice:
    """Which `rank` consecutive entries of an axis of length `size` a sig_type picks."""
    if sig_type == "principal":
        return slice(0, rank)
    if sig_type == "last":
        return slice(size - rank, size)
    if sig_type == "middle":
        start = math.ceil((size - rank) / 2)
        return slice(start, start + rank)
    raise ValueError(f"--sig_type must be one of {SIG_TYPES}, got {sig_type!r}")


def orthogonal_init(
    in_features: int, out_features: int, rank: int, sig_type: str, svd_device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, P, lambda) from the SVD of R ~ N(0, std 1/rank), R of shape (in, out).

    As in the authors' code: Q = rows of U (rank x in), P = columns of Vh (out x rank), lambda = S (1 x rank).
    R is drawn on the CPU from the global generator (so a seed gives the same draw everywhere); the SVD runs
    on `svd_device` (the accelerator when there is one).
    """
    base = torch.normal(mean=0.0, std=1 / rank, size=(in_features, out_features))
    u, s, vh = torch.linalg.svd(base.to(svd_device or "cpu"), full_matrices=True)
    q = u[_svd_slice(u.shape[0], rank, sig_type)]
    p = vh[:, _svd_slice(vh.shape[1], rank, sig_type)]
    lam = s[None, _svd_slice(s.shape[0], rank, sig_type)]
    return q.cpu().contiguous(), p.cpu().contiguous(), lam.cpu().contiguous()


class OrthoLoRAAdapter(nn.Module):
    """T-LoRA: P((Qx) * lambda * mask) - P0((Q0x) * lambda0 * mask), trainable Q, P, lambda.

    Keys: ``q_layer.weight`` (r x in), ``p_layer.weight`` (out x r), ``lambda_layer`` (1 x r) and the frozen
    ``base_q.weight``, ``base_p.weight``, ``base_lambda``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        sig_type: str = "last",
        init: bool = True,
        svd_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.q_layer = nn.Linear(in_features, rank, bias=False)
        self.p_layer = nn.Linear(rank, out_features, bias=False)
        self.lambda_layer = nn.Parameter(torch.ones(1, rank))
        if init:
            q, p, lam = orthogonal_init(in_features, out_features, rank, sig_type, svd_device)
            with torch.no_grad():
                self.q_layer.weight.copy_(q)
                self.p_layer.weight.copy_(p)
                self.lambda_layer.copy_(lam)
        # Copies, not new layers: a new nn.Linear would draw from the RNG and shift every later adapter's start.
        self.base_q = copy.deepcopy(self.q_layer).requires_grad_(False)
        self.base_p = copy.deepcopy(self.p_layer).requires_grad_(False)
        self.base_lambda = nn.Parameter(self.lambda_layer.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # One down-projection for both paths (x is read once) and one multiply by lambda * mask (a 0/1 mask
        # makes this bitwise equal to multiplying by each in turn); two up-projections, so that the
        # difference is exactly zero while P = P0, L = L0, Q = Q0.
        down = F.linear(x.to(self.q_layer.weight.dtype), torch.cat([self.q_layer.weight, self.base_q.weight]))
        scale = torch.cat([self.lambda_layer, self.base_lambda], dim=1)
        if mask is not None:
            scale = scale * mask[:, : self.rank].to(scale.device).repeat(1, 2)
        trained, frozen = _scale_rank(down, scale).split(self.rank, dim=-1)
        return (self.p_layer(trained) - self.base_p(frozen)).to(x.dtype)


def make_adapter(
    trainer_type: str,
    in_features: int,
    out_features: int,
    rank: int,
    sig_type: str = "last",
    init: bool = True,
    svd_device: torch.device | str | None = None,
) -> nn.Module:
    """The adapter for `trainer_type`; `init=False` skips the random start (the checkpoint fills it)."""
    if trainer_type == "lora":
        return LoRAAdapter(in_features, out_features, rank, init=init)
    if trainer_type == "ortho_lora":
        return OrthoLoRAAdapter(in_features, out_features, rank, sig_type, init=init, svd_device=svd_device)
    raise ValueError(f"--trainer_type must be one of {TRAINER_TYPES}, got {trainer_type!r}")
