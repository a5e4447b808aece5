"""tlora: T-LoRA (timestep-dependent LoRA) for Stable Diffusion XL, FLUX.1 and FLUX.2 [klein] on diffusers."""

import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """transformers says on every import that it uses its PIL image processors because torchvision is
    missing; that is what tlora wants (it never needs torchvision), so this one notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

from tlora.common.messages import AssumedSetting
from tlora.families import attach
from tlora.generate.api import load, set_scale, unload
from tlora.generate.scheduled import scheduled
from tlora.method.adapters import LoRAAdapter, OrthoLoRAAdapter, active_rank, rank_mask
from tlora.method.injection import TLoRA, attached
from tlora.method.settings import TLoRASettings
from tlora.runs.reading import Checkpoint, read

__all__ = [
    "AssumedSetting", "Checkpoint", "LoRAAdapter", "OrthoLoRAAdapter", "TLoRA", "TLoRASettings", "active_rank",
    "attach", "attached", "load", "rank_mask", "read", "scheduled", "set_scale", "unload",
]
__version__ = "0.1.0"
