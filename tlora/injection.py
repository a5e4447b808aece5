"""Attaching T-LoRA adapters to a diffusers UNet without touching its attention processors.

Each `to_q`, `to_k`, `to_v`, `to_out.0` Linear of every `Attention` module is swapped for a `TLoRALinear`
that shares the original weight and adds the adapter's output, so SDPA, flash or xformers processors keep
running. A forward pre-hook on the UNet reads the `timestep` it is called with and sets the rank mask for
that call, so any SDXL pipeline and any scheduler gets the right mask at every step with no extra code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .adapters import make_adapter, rank_mask
from .checkpoint import check_keys

PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


@dataclass
class MaskState:
    """What every adapter of one UNet shares: the current rank mask and the adapter scale."""

    max_rank: int
    min_rank: int = 1
    alpha: float = 1.0
    num_train_timesteps: int = 1000
    timestep_dependent: bool = True
    scale: float = 1.0
    mask: torch.Tensor | None = field(default=None, repr=False)

    def set_timestep(self, timestep: torch.Tensor | float, device: torch.device) -> None:
        """Set the mask for a UNet call at `timestep` (scalar or one per sample); no host sync."""
        if not self.timestep_dependent:
            self.mask = None
            return
        t = torch.as_tensor(timestep, device=device)
        self.mask = rank_mask(t, self.num_train_timesteps, self.max_rank, self.min_rank, self.alpha)


class TLoRALinear(nn.Linear):
    """A Linear that shares `base`'s weight and bias and adds `scale * adapter(x, mask)`."""

    def __init__(self, base: nn.Linear, adapter: nn.Module, state: MaskState) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapter = adapter
        # Plain attributes, not submodules: kept out of state_dict and parameters().
        self.__dict__["state"] = state
        self.__dict__["original"] = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        scale = self.state.scale
        if scale == 0:
            return out
        delta = self.adapter(x, self.state.mask)
        return out + delta if scale == 1 else out + scale * delta


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = _get(module, parent) if parent else module
    if last.isdigit():
        owner[int(last)] = value
    else:
        setattr(owner, last, value)


class TLoRA:
    """The adapters attached to one UNet: their parameters, checkpoint keys, scale, and `unload()`."""

    def __init__(self, unet: nn.Module, state: MaskState, layers: dict[str, tuple[str, TLoRALinear]]) -> None:
        self.unet, self.state, self.layers = unet, state, layers
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        unet._tlora = self

    def _on_unet_call(self, unet: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.state.set_timestep(timestep, sample.device)

    @property
    def adapters(self) -> dict[str, nn.Module]:
        """Checkpoint key prefix (e.g. `mid_block....attn1.processor.to_q_lora`) -> adapter."""
        return {prefix: layer.adapter for prefix, (_, layer) in self.layers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The authors' checkpoint layout: `<prefix>.<param>`, float32, contiguous, on the CPU."""
        return {
            f"{prefix}.{name}": tensor.detach().to("cpu", torch.float32).contiguous()
            for prefix, adapter in self.adapters.items()
            for name, tensor in adapter.state_dict().items()
        }

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's tensors; fails naming the first missing, extra or mis-shaped key."""
        check_keys({k: v.shape for k, v in self.state_dict().items()}, state_dict)
        for prefix, adapter in self.adapters.items():
            adapter.load_state_dict({name: state_dict[f"{prefix}.{name}"] for name in adapter.state_dict()})

    def set_scale(self, scale: float) -> None:
        """Multiply every adapter's output by `scale` (0 = the base model)."""
        self.state.scale = float(scale)

    def unload(self) -> nn.Module:
        """Put the original Linear layers back and remove the hook; the UNet is as before attaching."""
        for path, layer in self.layers.values():
            _set(self.unet, path, layer.original)
        self._hook.remove()
        del self.unet._tlora
        return self.unet


def attached(unet: nn.Module) -> TLoRA | None:
    """The TLoRA attached to `unet`, if any."""
    return getattr(unet, "_tlora", None)


def attach(
    unet: nn.Module,
    trainer_type: str,
    lora_rank: int,
    min_rank: int = 1,
    alpha_rank_scale: float = 1.0,
    sig_type: str = "last",
    timestep_dependent: bool = True,
    init: bool = True,
    num_train_timesteps: int = 1000,
    svd_device: torch.device | str | None = None,
) -> TLoRA:
    """Wrap every attention projection of `unet` with a fresh adapter (float32, on the UNet's device).

    Adapters are made in the order of `unet.attn_processors` and q, k, v, out within a module, as the
    authors' code does, so one seed gives the same initial adapters in both tools.
    """
    if attached(unet) is not None:
        raise ValueError("this UNet already has T-LoRA adapters; call unload() first")
    state = MaskState(lora_rank, min_rank, alpha_rank_scale, num_train_timesteps, timestep_dependent)
    device = next(unet.parameters()).device
    layers: dict[str, tuple[str, TLoRALinear]] = {}
    for name, module in list(unet.named_modules()):
        if not isinstance(module, Attention):
            continue
        for proj, key in PROJECTIONS.items():
            base = _get(module, proj)
            rank = min(lora_rank, base.in_features, base.out_features)
            adapter = make_adapter(trainer_type, base.in_features, base.out_features, rank, sig_type, init, svd_device)
            layer = TLoRALinear(base, adapter.to(device), state)
            _set(module, proj, layer)
            layers[f"{name}.processor.{key}"] = (f"{name}.{proj}", layer)
    if not layers:
        raise ValueError("no diffusers Attention modules found in this model")
    return TLoRA(unet, state, layers)
