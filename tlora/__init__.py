"""tlora: T-LoRA (timestep-dependent LoRA) for Stable Diffusion XL on diffusers."""

from .adapters import LoRAAdapter, OrthoLoRAAdapter, active_rank, rank_mask
from .api import load, set_scale, unload
from .injection import TLoRA, attach, attached

__all__ = [
    "LoRAAdapter", "OrthoLoRAAdapter", "TLoRA", "active_rank", "attach", "attached", "load", "rank_mask",
    "set_scale", "unload",
]
__version__ = "0.1.0"
