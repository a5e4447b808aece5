"""tlora: T-LoRA (timestep-dependent LoRA) for Stable Diffusion XL and FLUX on diffusers."""

import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """transformers says on every import that it uses its PIL image processors because torchvision is
    missing; that is what tlora wants (it never needs torchvision), so this one notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

from .adapters import LoRAAdapter, OrthoLoRAAdapter, active_rank, rank_mask
from .api import load, set_scale, unload
from .injection import TLoRA, attach, attached
from .reading import AssumedSetting, Checkpoint, read
from .scheduled import scheduled
from .settings import TLoRASettings

__all__ = [
    "AssumedSetting", "Checkpoint", "LoRAAdapter", "OrthoLoRAAdapter", "TLoRA", "TLoRASettings", "active_rank",
    "attach", "attached", "load", "rank_mask", "read", "scheduled", "set_scale", "unload",
]
__version__ = "0.1.0"
