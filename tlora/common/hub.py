"""Where a model comes from: a local folder in diffusers layout or a Hugging Face hub id found in the cache
(HF_HUB_OFFLINE) or online, checked before anything loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tlora.common.errors import UsageError, first_line
from tlora.common.messages import DIFFUSERS_LAYOUT, HUB_FIX

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(flag: str, name: str, needs: str = "model_index.json", revision: str | None = None) -> None:
    """A local folder holding `needs`, or a hub id that can be had: cached when HF_HUB_OFFLINE is set.

    Online, a hub id is not looked up here (that would be a network call); a load that then fails is
    reported in one line by the caller.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not (path / needs).is_file():
            raise UsageError(f"{flag}: {name} has no {needs}; {DIFFUSERS_LAYOUT}")
        return
    if not HUB_ID.match(name):
        raise UsageError(f"{flag}: {name} does not exist; pass a local folder or a hub id like org/model")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, needs, revision=revision), str):
            raise UsageError(
                f"{flag}: {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it first (hf download {name}) or pass a local folder"
            )


def model_load_error(flag: str, name: str, err: Exception) -> UsageError:
    """One line for a model that could not be loaded (not found, no network, no access)."""
    return UsageError(f"{flag}: could not load {name} ({first_line(err)}); {HUB_FIX}")
