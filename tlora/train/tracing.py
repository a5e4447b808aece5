"""Running a model on the `meta` device (shapes, no memory, no compute) as an accelerator would run it, and
counting what it would hold and compute.

- `Flops` counts FLOPs with torch's formulas.
- `LiveBytes` counts the bytes of every tensor storage alive, from the op that makes it until it is freed,
  by category (weights, adapters, gradients, optimizer state, activations); its peak is what
  `torch.cuda.max_memory_allocated()` reports, less the allocator's rounding.
- `GPUKernels` makes the step take the paths CUDA takes where `meta` would not:
  * attention: `scaled_dot_product_attention` runs the flash kernel (fp16/bf16, no mask, head dim <= 256) or
    the memory-efficient one (otherwise), through their own aten ops, whose meta kernels give the tensors the
    GPU kernels allocate (the output and its log-sum-exp, no attention matrix) and whose FLOPs
    torch's formulas know;
  * autocast: `meta` has no autocast, so CUDA autocast's documented op lists are applied at the function level
    (matrix products and convolutions in the autocast dtype; norms, softmax, losses, exp, pow in float32),
    above autograd as autocast is, so that the copies it makes are saved for backward as they would be.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from tlora.method.adapters import MODELLED_AUTOCAST

CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "activations")


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@dataclass
class LiveBytes(TorchDispatchMode):
    """Live storage bytes by category, and the split at the highest total seen."""

    live: dict[int, tuple[int, str, weakref.ref]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def track(self, tensor: torch.Tensor, category: str = "activations") -> None:
        """Count `tensor`'s storage (once) under `category`; a storage already counted moves to `category`."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            self.recategorize(tensor, category)
            return
        size = storage.nbytes()
        self.live[key] = (size, category, weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.totals[category] += size
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.totals)

    def recategorize(self, tensor: torch.Tensor, category: str) -> None:
        key = _key(tensor)
        size, old, ref = self.live[key]
        self.totals[old] -= size
        self.totals[category] += size
        self.live[key] = (size, category, ref)

    def _free(self, key: int) -> None:
        size, category, _ = self.live.pop(key, (0, "activations", None))
        self.totals[category] -= size

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.total, dict(self.totals)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and _key(tensor) not in self.live:
                self.track(tensor)
        return out


@dataclass
class Flops(TorchDispatchMode):
    """FLOPs of every op, by torch's own formulas (`torch.utils.flop_counter`'s registry: matrix products,
    convolutions, attention kernels, forward and backward). Unlike FlopCounterMode it tracks no modules: its
    backward hooks keep gradient checkpointing's recomputed activations alive until the end of backward."""

    total: int = 0
    convolution: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            n = formula(*args, **(kwargs or {}), out_val=out)
            self.total += n
            if "convolution" in func._overloadpacket.__name__:
                self.convolution += n
        return out


# CUDA autocast's op lists (torch.amp docs: "CUDA Ops that can autocast to float16 / to float32"), as the Python
# functions and Tensor methods that reach them.
LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
         torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
         torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.einsum,
         F.prelu, F.scaled_dot_product_attention}
FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
           torch.log_softmax, torch.Tensor.log_softmax, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.cross_entropy,
           torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt,
           torch.Tensor.rsqrt, torch.log, torch.Tensor.log, F.softplus, torch.cumsum, torch.Tensor.cumsum,
           torch.prod, torch.Tensor.prod, F.normalize, torch.norm, torch.Tensor.norm, F.cosine_similarity,
           torch.Tensor.__rpow__}
HALF = (torch.float16, torch.bfloat16)


class GPUKernels(TorchFunctionMode):
    """CUDA's attention kernels and (with `autocast` a dtype) CUDA autocast, on meta tensors."""

    def __init__(self, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.autocast = autocast

    def __enter__(self):
        if self.autocast is not None:  # the adapters see autocast on, as on CUDA (they skip their input's cast)
            MODELLED_AUTOCAST.append("meta")
        return super().__enter__()

    def __exit__(self, *exc):
        if self.autocast is not None:  # one entry per tracer entered: a nested one leaves the outer's
            MODELLED_AUTOCAST.remove("meta")
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None:
            if func in LOWER:
                args, kwargs = _cast((args, kwargs), lambda t: t.is_floating_point(), self.autocast)
            elif func in FLOAT32:
                args, kwargs = _cast((args, kwargs), lambda t: t.dtype in HALF, torch.float32)
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cast(tree, which, dtype: torch.dtype):
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and which(x) and x.dtype != dtype else x,
                    tree)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as CUDA runs it: flash for half precision without a mask and head dim <= 256,
    else memory-efficient attention; neither holds the attention matrix."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if query.dtype in HALF and attn_mask is None and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, need_lse, dropout_p,
                                                                  is_causal, scale=scale)[0]
