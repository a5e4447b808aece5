"""All of T-LoRA's math: the timestep rank schedule, its mask, and the two adapter layers.

Rank schedule (paper, Eq. 6):  r(t) = int(((T - t) / T) ** alpha * (r_max - r_min)) + r_min
Vanilla T-LoRA (``lora``):      delta(x) = B (M_t * (A x)),                A ~ N(0, 1/r), B = 0
T-LoRA (``ortho_lora``):        delta(x) = P (M_t * L * (Q x)) - P0 (M_t * L0 * (Q0 x))

P, L, Q start from the SVD of a random N(0, std 1/r) matrix; P0, L0, Q0 are frozen copies of that start,
so delta is exactly zero before the first optimizer step. Parameter names match the authors' checkpoints.
The update is written once (`branches`): the adapters' forward (`apply`), exports and analysis
(`factors`, update = up @ down) all use it. Each rank component is multiplied by its gate: lambda times the
mask (Vanilla T-LoRA: the mask alone); the adapters' output multiplier is another thing (TLoRA.set_scale).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

TRAINER_TYPES = ("lora", "ortho_lora")
# Each trainer type's parameters as its adapter's state_dict (and every checkpoint: the authors' names) names them:
# the trained down (r x in) and up (out x r) projections first. Checkpoint keys are `<adapter prefix>.<name>`
# (tlora.runs.keys).
PARAMS = {
    "lora": ("down.weight", "up.weight"),
    "ortho_lora": ("q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda"),
}
SIG_TYPES = ("principal", "last", "middle")
# How each tool rounds r(t); all equal the paper's formula, but float rounding makes int() differ at some t
# (e.g. r - r_min = 75 at t = 160, r - r_min = 50 at t = 420), so each T-LoRA is masked as its tool masks it.
RANK_RULES = {  # named for their arithmetic; a family (or a file's tool) says which its T-LoRAs use
    "divide_first": "((T - t) / T) ** alpha * (r - r_min) in float32 (the authors' SDXL code)",
    "multiply_first": "(T - t) * (r - r_min) / T in float32 (the authors' FLUX code; alpha 1, else divide_first)",
    "float64": "int(t), then ((T - t) / T) ** alpha * (r - r_min) in float64, at most r (LyCORIS / SimpleTuner)",
}
DEFAULT_RULE = "divide_first"


def active_rank(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0,
    rule: str = DEFAULT_RULE,
) -> torch.Tensor:
    """r(t) for each timestep (int64), computed exactly as the tool named by `rule` computes it (RANK_RULES)."""
    T, span = num_train_timesteps, max_rank - min_rank
    t = torch.as_tensor(timesteps)
    if rule == "float64":
        frac = (T - t.to(torch.float64).trunc()) / T
        ranks = ((frac if alpha == 1 else frac ** alpha) * span).to(torch.int64) + min_rank
        return ranks.clamp(max=max_rank)
    if rule not in RANK_RULES:
        raise ValueError(f"rank rule must be one of {', '.join(RANK_RULES)}, got {rule!r}")
    t = t.to(torch.float32)
    if rule == "multiply_first" and alpha == 1:
        return ((T - t) * span / T).to(torch.int64) + min_rank
    return (((T - t) / T) ** alpha * span).to(torch.int64) + min_rank


def rank_mask(
    timesteps: torch.Tensor | float, num_train_timesteps: int, max_rank: int, min_rank: int, alpha: float = 1.0,
    rule: str = DEFAULT_RULE,
) -> torch.Tensor:
    """0/1 float mask of shape (N, max_rank): row i keeps the first r(t_i) rank components."""
    return mask_of(active_rank(timesteps, num_train_timesteps, max_rank, min_rank, alpha, rule).reshape(-1), max_rank)


def mask_of(ranks: torch.Tensor, max_rank: int) -> torch.Tensor:
    """0/1 float mask of shape ranks.shape + (max_rank,): the first ranks[i] rank components of entry i on."""
    positions = torch.arange(max_rank, device=ranks.device)
    return (positions < ranks[..., None]).to(torch.float32)


MODELLED_AUTOCAST: list[str] = []  # devices whose autocast a tracer models, once per tracer entered (GPUKernels: meta)


def autocast_on(device: str) -> bool:
    """Whether the products on `device` run under autocast (real, or modelled on meta as CUDA's)."""
    real = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return real or device in MODELLED_AUTOCAST


def as_saved(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as checkpoints hold them: detached, float32, contiguous, on the CPU."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


class Masks:
    """One denoiser call's rank mask (N x k, 0/1), cast to each dtype and device asked for once: every adapter of the
    call shares the casts (under torch.compile the graph casts it, fused)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._cast: dict[tuple, torch.Tensor] = {}

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def get(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.mask.to(device=device, dtype=dtype)
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = self.mask.to(device=device, dtype=dtype)
        return self._cast[key]


def as_masks(mask: torch.Tensor | Masks | None) -> Masks | None:
    return mask if mask is None or isinstance(mask, Masks) else Masks(mask)


def _gated(h: torch.Tensor, lam: torch.Tensor | None, masks: Masks | None, k: int, groups: int = 1) -> torch.Tensor:
    """h times its gate lambda * mask on the rank dimension (last), which holds `groups` blocks of k components side
    by side (adapters stacked: RowAdapters); lambda is (groups, k) or (1, k), the mask one row per sample (or one).
    cast(lambda) * mask equals cast(lambda * mask) bit for bit, the mask being 0/1."""
    if masks is None and lam is None:
        return h
    gate = None if lam is None else lam.to(h.dtype).reshape(1, groups, k)
    if masks is not None:
        m = masks.get(h.dtype, h.device)[:, :k]
        if m.shape[0] not in (1, h.shape[0]):
            raise ValueError(f"T-LoRA mask has {m.shape[0]} rows but the layer input has batch {h.shape[0]}")
        gate = m[:, None, :] if gate is None else gate * m[:, None, :]
    shape = (gate.shape[0], *([1] * (h.dim() - 2)), gate.shape[1], k)
    return (h.unflatten(-1, (groups, k)) * gate.reshape(shape)).flatten(-2)


# -- the update, once -----------------------------------------------------------------------------
class Branch(NamedTuple):
    """One term sign * up diag(lam * mask) down of an adapter's update."""

    down: torch.Tensor  # r x in
    lam: torch.Tensor | None  # 1 x r (lambda), None for 1
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
    raise unknown_trainer_type(trainer_type)


def unknown_trainer_type(trainer_type: str) -> ValueError:
    return ValueError(f"--trainer_type must be one of {TRAINER_TYPES}, got {trainer_type!r}")


def apply(parts: list[Branch], x: torch.Tensor, mask: torch.Tensor | Masks | None, out_dtype: torch.dtype | None = None,
          frozen: Callable[[torch.dtype], list[Branch]] | None = None) -> torch.Tensor:
    """The update applied to x, in `out_dtype` (default x's): per branch a down-projection, one multiply by its gate
    lambda * mask and an up-projection; the frozen start's branch is subtracted, so that the sum is exactly zero
    while the trained branch equals it. `frozen(dtype)` gives the frozen branches as their adapter keeps them in the
    compute dtype (cast once, sign folded into lambda: exactly the negated terms), in place of parts[1:]. Each
    branch has products of its own: one stacked down-projection gives the two branches different bits in some GEMM
    shapes (so no exact zero), and backward then computes no weight gradient for the frozen start's rows. A mask
    may end at the last active component (`MaskState.active`): only those are computed. Under autocast x is not
    converted to float32 first: autocast would convert it back for the product (bitwise the same, one copy less).
    Stacked adapters (RowAdapters) have a 3-D up (groups x out x r) and give (groups, *x.shape[:-1], out)."""
    masks = as_masks(mask)
    rank = parts[0].up.shape[-1]
    k = rank if masks is None else min(rank, masks.width)
    h_in = x if x.dtype == parts[0].down.dtype or autocast_on(x.device.type) else x.to(parts[0].down.dtype)
    out = _branch(h_in, parts[0], masks, k)
    for down, lam, up, sign in frozen(out.dtype) if frozen is not None else parts[1:]:
        y = _branch(h_in, Branch(down, lam, up, sign), masks, k)
        out = out + y if sign > 0 else out - y
    return out.to(out_dtype or x.dtype)


def _branch(h_in: torch.Tensor, branch: Branch, masks: Masks | None, k: int) -> torch.Tensor:
    """up diag(lambda * mask) down h_in, with the first k components; a 3-D up runs its groups as one batched
    product."""
    down, lam, up, _ = branch
    groups, rank = (1, up.shape[1]) if up.dim() == 2 else (up.shape[0], up.shape[2])
    if k < rank:
        down = down.unflatten(0, (groups, rank))[:, :k].flatten(0, 1)
        up, lam = up[..., :k].contiguous(), None if lam is None else lam[..., :k]
    h = F.linear(h_in, down)
    if lam is not None and h.dtype != lam.dtype:  # half-precision products: lambda scales the up-projection (below)
        up, lam = up * (lam if groups == 1 else lam[:, None, :]), None
    h = _gated(h, lam, masks, k, groups)
    if groups == 1:
        return F.linear(h, up)
    stacked = h.unflatten(-1, (groups, k)).movedim(-2, 0)  # (groups, *lead, k): a view
    y = _BatchedUp.apply(stacked.reshape(groups, -1, k), up.to(h.dtype))
    return y.reshape(groups, *h.shape[:-1], up.shape[1])


class _BatchedUp(torch.autograd.Function):
    """bmm(h, up^T) for stacked adapters (h: groups x M x k, up: groups x out x k), whose backward gives up's gradient
    in up's own layout (g^T h): a plain bmm's is the transpose of it, which each adapter's up weight would copy into
    its own layout (one copy per adapter per step)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, up)
        return torch.bmm(h, up.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, up = ctx.saved_tensors
        return (torch.bmm(grad, up) if ctx.needs_input_grad[0] else None,
                torch.bmm(grad.transpose(1, 2), h) if ctx.needs_input_grad[1] else None)


def factors(parts: list[Branch], mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The update as LoRA factors (down k x in, up out x k) with `mask` (1 x r) folded in, so that
    update = up @ down; component i of branch j is row/column j * r + i."""
    rank = parts[0].down.shape[0]
    m = torch.ones(1, rank, dtype=parts[0].down.dtype) if mask is None else mask[:, :rank].to(parts[0].down.dtype)
    down = torch.cat([(m if b.lam is None else b.lam * m).T * b.down for b in parts])
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
        return [Branch(self.down.weight, None, self.up.weight, 1)]  # branches(params, "lora"), without a dict a call

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Masks | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return apply(self.branches(), x, mask, out_dtype)


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


class OrthoLoRAAdapter(nn.Module):
    """T-LoRA: P((Qx) * lambda * mask) - P0((Q0x) * lambda0 * mask), trainable Q, P, lambda.

    Keys: ``q_layer.weight`` (r x in), ``p_layer.weight`` (out x r), ``lambda_layer`` (1 x r) and the frozen
    ``base_q.weight``, ``base_p.weight``, ``base_lambda``. Made with the trained and frozen factors equal (the
    update is zero); `start` sets T-LoRA's start (attach: `orthogonal_starts` of each adapter's `draw_base`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.q_layer = nn.Linear(in_features, rank, bias=False)
        self.p_layer = nn.Linear(rank, out_features, bias=False)
        self.lambda_layer = nn.Parameter(torch.ones(1, rank))
        # Copies, not new layers: a new nn.Linear would draw from the RNG and shift every later adapter's start.
        self.base_q = copy.deepcopy(self.q_layer).requires_grad_(False)
        self.base_p = copy.deepcopy(self.p_layer).requires_grad_(False)
        self.base_lambda = nn.Parameter(self.lambda_layer.detach().clone(), requires_grad=False)
        self._frozen = FrozenCast()

    @torch.no_grad()
    def start(self, q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor,
              frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Set the trained factors to (Q, P, lambda) and the frozen ones to `frozen` (Q0, P0, lambda0; default the
        same: a start whose update is zero)."""
        params = ((self.q_layer.weight, self.base_q.weight), (self.p_layer.weight, self.base_p.weight),
                  (self.lambda_layer, self.base_lambda))
        for (trained, base), value, base_value in zip(params, (q, p, lam), frozen or (q, p, lam)):
            trained.copy_(value)
            base.copy_(base_value)

    def branches(self) -> list[Branch]:
        """branches(params, "ortho_lora"), read straight from the attributes (no dict built at every call)."""
        return [Branch(self.q_layer.weight, self.lambda_layer, self.p_layer.weight, 1),
                Branch(self.base_q.weight, self.base_lambda, self.base_p.weight, -1)]

    def _apply(self, fn, recurse: bool = True):
        self._frozen = FrozenCast()  # moved or converted: the cast is made again where the factors are
        return super()._apply(fn, recurse)

    def frozen(self, dtype: torch.dtype) -> list[Branch]:
        """The frozen start's branch in `dtype`, its sign folded into lambda (-lambda0): cast once, not at every call
        (FrozenCast)."""
        return self._frozen.get((self.base_q.weight, self.base_lambda, self.base_p.weight), dtype, negated_branch)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Masks | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return apply(self.branches(), x, mask, out_dtype, self.frozen)


def negated_branch(dtype: torch.dtype, down: torch.Tensor, lam: torch.Tensor, up: torch.Tensor) -> list[Branch]:
    """One branch, subtracted, made as `_branch` computes it in `dtype`: -lambda on the gate (products in the
    parameters' dtype) or on the up-projection (half-precision products), negating being exact."""
    if dtype == lam.dtype:
        return [Branch(down, -lam, up, 1)]
    return [Branch(down.to(dtype), None, (up * -(lam if up.dim() == 2 else lam[:, None, :])).to(dtype), 1)]


class FrozenCast:
    """Tensors made from frozen ones in a compute dtype, made once and made again when any source changes (loaded,
    started, moved: its storage or version) or another dtype is asked for; dropped when the module moves
    (`_apply`). Not state: never saved. A write through `.data` bumps no version: go through `load_state_dict`
    or `start`. Inference tensors (made under torch.inference_mode) keep no version either: never cached."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value = None

    def get(self, sources: tuple[torch.Tensor, ...], dtype: torch.dtype, make: Callable) -> list[Branch]:
        if torch.compiler.is_compiling() or any(t.is_inference() for t in sources):  # (the graph casts them, fused)
            return make(dtype, *sources)
        key = (dtype, *((t.device, t.data_ptr(), t._version) for t in sources))
        if key != self.key:  # made as ordinary tensors even in inference mode, so that a later step can save them
            with torch.inference_mode(False), torch.no_grad():
                self.key, self.value = key, make(dtype, *sources)
        return self.value


def make_adapter(trainer_type: str, in_features: int, out_features: int, rank: int, init: bool = True) -> nn.Module:
    """The adapter for `trainer_type`; `init=False` skips a Vanilla T-LoRA's random start (the checkpoint fills it).
    A T-LoRA's start is set by `OrthoLoRAAdapter.start` (attach decomposes every adapter's together)."""
    if trainer_type == "lora":
        return LoRAAdapter(in_features, out_features, rank, init=init)
    if trainer_type == "ortho_lora":
        return OrthoLoRAAdapter(in_features, out_features, rank)
    raise unknown_trainer_type(trainer_type)
