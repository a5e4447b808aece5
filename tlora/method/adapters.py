"""All of T-LoRA's math: the timestep rank schedule, its mask, and the two adapter layers.

Rank schedule (paper, Eq. 6):  r(t) = int(((T - t) / T) ** alpha * (r_max - r_min)) + r_min
Vanilla T-LoRA (``lora``):      delta(x) = B (M_t * (A x)),                A ~ N(0, 1/r), B = 0
T-LoRA (``ortho_lora``):        delta(x) = P (M_t * L * (Q x)) - P0 (M_t * L0 * (Q0 x))

P, L, Q start from the SVD of a random N(0, std 1/r) matrix; P0, L0, Q0 are frozen copies of that start,
so delta is exactly zero before the first optimizer step. Parameter names match the authors' checkpoints.
The update is written once (`branches`): the adapters' forward (`apply`), exports and analysis
(`factors`, update = up @ down) all use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

TRAINER_TYPES = ("lora", "ortho_lora")
SIG_TYPES = ("principal", "last", "middle")
# How each tool rounds r(t); all equal the paper's formula, but float rounding makes int() differ at some t
# (e.g. r - r_min = 75 at t = 160, r - r_min = 50 at t = 420), so each T-LoRA is masked as its tool masks it.
RANK_RULES = {
    "sdxl": "((T - t) / T) ** alpha * (r - r_min) in float32 (the authors' SDXL code)",
    "flux": "(T - t) * (r - r_min) / T in float32 (the authors' FLUX code; alpha 1, else as sdxl)",
    "lycoris": "int(t), then ((T - t) / T) ** alpha * (r - r_min) in float64, at most r (LyCORIS / SimpleTuner)",
}


def active_rank(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0,
    rule: str = "sdxl",
) -> torch.Tensor:
    """r(t) for each timestep (int64), computed exactly as the tool named by `rule` computes it (RANK_RULES)."""
    T, span = num_train_timesteps, max_rank - min_rank
    t = torch.as_tensor(timesteps)
    if rule == "lycoris":
        frac = (T - t.to(torch.float64).trunc()) / T
        ranks = ((frac if alpha == 1 else frac ** alpha) * span).to(torch.int64) + min_rank
        return ranks.clamp(max=max_rank)
    if rule not in RANK_RULES:
        raise ValueError(f"rank rule must be one of {', '.join(RANK_RULES)}, got {rule!r}")
    t = t.to(torch.float32)
    if rule == "flux" and alpha == 1:
        return ((T - t) * span / T).to(torch.int64) + min_rank
    return (((T - t) / T) ** alpha * span).to(torch.int64) + min_rank


def rank_mask(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0,
    rule: str = "sdxl",
) -> torch.Tensor:
    """0/1 float mask of shape (N, max_rank): row i keeps the first r(t_i) rank components."""
    ranks = active_rank(timesteps, num_train_timesteps, max_rank, min_rank, alpha, rule).reshape(-1, 1)
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


# -- the update, once -----------------------------------------------------------------------------
class Branch(NamedTuple):
    """One term sign * up diag(scale * mask) down of an adapter's update."""

    down: torch.Tensor  # r x in
    scale: torch.Tensor | None  # 1 x r (lambda), None for 1
    up: torch.Tensor  # out x r
    sign: int  # +1, or -1 for T-LoRA's frozen start


def branches(params: Mapping[str, torch.Tensor], trainer_type: str) -> list[Branch]:
    """The update of one adapter from its parameters (the authors' names), as a sum of branches:
    lora: B M A; ortho_lora: P L M Q - P0 L0 M Q0."""
    if trainer_type == "lora":
        return [Branch(params["down.weight"], None, params["up.weight"], 1)]
    if trainer_type == "ortho_lora":
        return [Branch(params["q_layer.weight"], params["lambda_layer"], params["p_layer.weight"], 1),
                Branch(params["base_q.weight"], params["base_lambda"], params["base_p.weight"], -1)]
    raise ValueError(f"--trainer_type must be one of {TRAINER_TYPES}, got {trainer_type!r}")


def apply(parts: list[Branch], x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The update applied to x: per branch a down-projection, one multiply by scale * mask (bitwise equal to
    multiplying by each in turn, the mask being 0/1) and an up-projection; the frozen start's branch is
    subtracted, so that the sum is exactly zero while the trained branch equals it. Each branch has products of
    its own: one stacked down-projection gives the two branches different bits in some GEMM shapes (so no exact
    zero), and backward then computes no weight gradient for the frozen start's rows. A mask may end at the last
    active component (`MaskState.active`): only those are computed. Under autocast x is not converted to float32
    first: autocast would convert it back for the product (bitwise the same, one copy less)."""
    rank = parts[0].down.shape[0]
    dtype = parts[0].down.dtype
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    h_in = x if x.dtype == dtype or autocast else x.to(dtype)
    m = None if mask is None else mask[:, :rank]
    k = rank if m is None else m.shape[1]
    out = None
    for down, scale, up, sign in parts:
        if k < rank:
            down, up = down[:k], up[:, :k].contiguous()
            scale = None if scale is None else scale[:, :k]
        scale = scale if m is None else m if scale is None else scale * m.to(scale.device)
        y = F.linear(_scale_rank(F.linear(h_in, down), scale), up)
        out = y if out is None else out + y if sign > 0 else out - y
    return out.to(x.dtype)


def factors(parts: list[Branch], mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The update as LoRA factors (down k x in, up out x k) with `mask` (1 x r) folded in, so that
    update = up @ down; component i of branch j is row/column j * r + i."""
    rank = parts[0].down.shape[0]
    m = torch.ones(1, rank, dtype=parts[0].down.dtype) if mask is None else mask[:, :rank].to(parts[0].down.dtype)
    down = torch.cat([(m if b.scale is None else b.scale * m).T * b.down for b in parts])
    return down, torch.cat([b.sign * b.up for b in parts], dim=1)


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

    def branches(self) -> list[Branch]:
        return branches(dict(self.named_parameters()), "lora")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply(self.branches(), x, mask)


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


def draw_base(in_features: int, out_features: int, rank: int) -> torch.Tensor:
    """R ~ N(0, std 1/rank) of shape (in, out), drawn on the CPU from the global generator (the authors' draw, so
    that a seed gives the same start everywhere)."""
    return torch.normal(mean=0.0, std=1 / rank, size=(in_features, out_features))


def orthogonal_starts(bases: list[torch.Tensor], ranks: list[int], sig_type: str,
                      svd_device: torch.device | str | None = None, batch_bytes: int = 2**30
                      ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(Q, P, lambda) from the full SVD of each R, as in the authors' code: Q = rows of U (rank x in), P = columns
    of Vh (out x rank), lambda = S (1 x rank). On an accelerator (`svd_device`) the SVDs run batched by shape, each
    result bitwise what one SVD of that matrix there gives; on the CPU one by one (LAPACK decomposes a batch one
    matrix at a time anyway, and the batch only costs memory: measured 10-20% slower for SDXL's 560)."""
    device = torch.device(svd_device or "cpu")
    batch_bytes = batch_bytes if device.type != "cpu" else 0
    groups: dict[tuple, list[int]] = {}
    for i, base in enumerate(bases):
        groups.setdefault(tuple(base.shape), []).append(i)
    out: list = [None] * len(bases)
    for shape, members in groups.items():
        per = max(1, batch_bytes // (4 * (shape[0] ** 2 + shape[1] ** 2 + shape[0] * shape[1])))
        for start in range(0, len(members), per):
            chunk = members[start:start + per]
            u, s, vh = torch.linalg.svd(torch.stack([bases[i] for i in chunk]).to(device), full_matrices=True)
            u, s, vh = u.cpu(), s.cpu(), vh.cpu()
            for j, i in enumerate(chunk):
                rows, cols = _svd_slice(shape[0], ranks[i], sig_type), _svd_slice(shape[1], ranks[i], sig_type)
                lam = _svd_slice(s.shape[1], ranks[i], sig_type)
                out[i] = (u[j, rows].contiguous(), vh[j][:, cols].contiguous(), s[j, None, lam].contiguous())
    return out


def orthogonal_init(
    in_features: int, out_features: int, rank: int, sig_type: str, svd_device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, P, lambda) of one adapter: draw_base, then orthogonal_starts."""
    return orthogonal_starts([draw_base(in_features, out_features, rank)], [rank], sig_type, svd_device)[0]


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
        # Copies, not new layers: a new nn.Linear would draw from the RNG and shift every later adapter's start.
        self.base_q = copy.deepcopy(self.q_layer).requires_grad_(False)
        self.base_p = copy.deepcopy(self.p_layer).requires_grad_(False)
        self.base_lambda = nn.Parameter(self.lambda_layer.detach().clone(), requires_grad=False)
        if init:
            self.start(*orthogonal_init(in_features, out_features, rank, sig_type, svd_device))

    @torch.no_grad()
    def start(self, q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> None:
        """Set the trained and the frozen factors to the same start (Q, P, lambda)."""
        for trained, frozen, value in ((self.q_layer.weight, self.base_q.weight, q),
                                       (self.p_layer.weight, self.base_p.weight, p),
                                       (self.lambda_layer, self.base_lambda, lam)):
            trained.copy_(value)
            frozen.copy_(value)

    def branches(self) -> list[Branch]:
        return branches(dict(self.named_parameters()), "ortho_lora")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return apply(self.branches(), x, mask)


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
