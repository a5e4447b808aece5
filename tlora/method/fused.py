"""T-LoRA's update P (M L Q x) - P0 (M L0 Q0 x) with a hand-written backward, for training (`adapters.apply` is
the definition and is used everywhere else).

Autograd would run four products forward and six backward, and compute a weight gradient for the frozen start's
rows as well. Here one down-projection serves both branches (the same GEMM for Q and Q0, so that the two branches
stay bitwise equal at the start and the update exactly zero), and backward runs four products: the rank gradient
of both branches at once, P's and Q's gradients, and x's gradient through both branches at once. Lambda's gradient
is a reduction. Nothing of the frozen start gets a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (N or 1, k) scale shaped to multiply the last dimension of `like` (N, ..., k) sample by sample."""
    if scale.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"T-LoRA mask has {scale.shape[0]} rows but the layer input has batch {like.shape[0]}")
    return scale.to(like.dtype).reshape(scale.shape[0], *([1] * (like.dim() - 2)), scale.shape[1])


class TrainedMinusStart(torch.autograd.Function):
    """(x Q^T * L M) P^T - (x Q0^T * L0 M) P0^T, differentiable in x, Q, L and P."""

    @staticmethod
    def forward(ctx, x, q, lam, p, q0, lam0, p0, mask):
        k = q.shape[0]
        down = torch.cat([q, q0])
        h = F.linear(x, down)
        h1, h0 = h[..., :k], h[..., k:]
        m = None if mask is None else mask.to(lam.device)
        s1 = _per_sample(lam if m is None else lam * m, h)
        s0 = _per_sample(lam0 if m is None else lam0 * m, h)
        y = F.linear(h1 * s1, p) - F.linear(h0 * s0, p0)
        ctx.save_for_backward(x, down, torch.cat([p, p0], dim=1), h1, s1, s0,
                              _per_sample(torch.ones_like(lam) if m is None else m, h))
        return y

    @staticmethod
    def backward(ctx, g):
        x, down, up, h1, s1, s0, m = ctx.saved_tensors
        k = h1.shape[-1]
        ga = F.linear(g, up.T)  # (..., 2k): the gradient at both branches' scaled rank components
        ga1, ga0 = ga[..., :k], -ga[..., k:]
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_p = flat_g.T.mm((h1 * s1).reshape(-1, k).to(flat_g.dtype))
        gh1 = ga1 * s1
        grad_q = gh1.reshape(-1, k).T.mm(flat_x.to(gh1.dtype))
        grad_lam = (ga1 * h1 * m).reshape(-1, k).sum(0, keepdim=True)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(torch.cat([gh1, ga0 * s0], dim=-1), down.T)
        return grad_x, grad_q, grad_lam, grad_p, None, None, None, None


def trained_minus_start(x, q, lam, p, q0, lam0, p0, mask):
    """The update for x, mask (N or 1, k) or None. Under autocast the products run in the autocast dtype as autocast
    would run them: the weights are cast first (autograd carries their gradients back to float32)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return TrainedMinusStart.apply(x.to(dtype), *(t.to(dtype) for t in (q, lam, p, q0, lam0, p0)), mask)
    return TrainedMinusStart.apply(x, q, lam, p, q0, lam0, p0, mask)
