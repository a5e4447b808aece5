"""Attaching T-LoRA adapters to a diffusers UNet without touching its modules or attention processors.

Each `to_q`, `to_k`, `to_v`, `to_out.0` Linear of every `Attention` module gets the adapter as a submodule
(`timestep_adapter`, so that `.to()`, DDP and optimizers see it) and a forward hook that adds the adapter's
output. Nothing is replaced, so SDPA, flash or xformers processors keep running, and other LoRAs loaded
with diffusers/peft (before or after; their layers wrap the Linear as `base_layer`) apply alongside and
unload on their own. A forward pre-hook on the UNet reads the `timestep` it is called with and sets the
rank mask for that call, so any SDXL pipeline and any scheduler gets the right mask at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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


ADAPTER = "timestep_adapter"  # the adapter's name on its Linear; no "lora" in it, so peft never takes it for its own


def base_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear that computes a projection: the module itself, or the base layer of a peft LoRA layer."""
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    if not isinstance(module, nn.Linear):
        raise ValueError(f"expected a Linear attention projection, found {type(module).__name__}")
    return module


class _AddAdapter:
    """Forward hook of a projection Linear: output + scale * adapter(input, mask)."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        scale = self.state.scale
        if scale == 0:
            return output
        delta = getattr(linear, ADAPTER)(inputs[0], self.state.mask)
        return output + delta if scale == 1 else output + scale * delta


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


class TLoRA:
    """The adapters attached to one UNet: their parameters, checkpoint keys, scale, and `unload()`."""

    def __init__(self, unet: nn.Module, state: MaskState, layers: dict[str, tuple[str, nn.Linear]]) -> None:
        self.unet, self.state, self.layers = unet, state, layers
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        add = _AddAdapter(state)
        self._layer_hooks = [linear.register_forward_hook(add) for _, linear in layers.values()]
        unet._tlora = self

    def _on_unet_call(self, unet: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.state.set_timestep(timestep, sample.device)

    @property
    def adapters(self) -> dict[str, nn.Module]:
        """Checkpoint key prefix (e.g. `mid_block....attn1.processor.to_q_lora`) -> adapter."""
        return {prefix: getattr(linear, ADAPTER) for prefix, (_, linear) in self.layers.items()}

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
        """Remove exactly what attach added (adapters and hooks); other LoRAs stay as they are."""
        for hook in self._layer_hooks:
            hook.remove()
        for _, linear in self.layers.values():
            delattr(linear, ADAPTER)
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
    """Give every attention projection of `unet` a fresh adapter (float32, on the UNet's device).

    Adapters are made in the order of `unet.attn_processors` and q, k, v, out within a module, as the
    authors' code does, so one seed gives the same initial adapters in both tools.
    """
    if attached(unet) is not None:
        raise ValueError("this UNet already has T-LoRA adapters; call unload() first")
    state = MaskState(lora_rank, min_rank, alpha_rank_scale, num_train_timesteps, timestep_dependent)
    adapters: dict[str, tuple[str, nn.Module]] = {}
    for name, module in list(unet.named_modules()):
        if not isinstance(module, Attention):
            continue
        for proj, key in PROJECTIONS.items():
            linear = base_linear(_get(module, proj))
            rank = min(lora_rank, linear.in_features, linear.out_features)
            adapter = make_adapter(trainer_type, linear.in_features, linear.out_features, rank, sig_type, init, svd_device)
            adapters[f"{name}.processor.{key}"] = (f"{name}.{proj}", adapter)
    if not adapters:
        raise ValueError("no diffusers Attention modules found in this model")
    return attach_adapters(unet, state, adapters)


def attach_adapters(unet: nn.Module, state: MaskState, adapters: dict[str, tuple[str, nn.Module]]) -> TLoRA:
    """Attach ready-made adapters: checkpoint key prefix -> (path of the Linear in `unet`, adapter)."""
    if attached(unet) is not None:
        raise ValueError("this UNet already has T-LoRA adapters; call unload() first")
    device = next(unet.parameters()).device
    layers: dict[str, tuple[str, nn.Linear]] = {}
    for prefix, (path, adapter) in adapters.items():
        linear = base_linear(_get(unet, path))
        linear.add_module(ADAPTER, adapter.to(device))
        layers[prefix] = (path, linear)
    return TLoRA(unet, state, layers)
