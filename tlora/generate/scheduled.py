"""The exact T-LoRA in stock diffusers: standard LoRA chunks switched per denoising step with set_adapters.

    python -m tlora.export RUN/checkpoint-800 --format diffusers-scheduled --out dog_scheduled
    step = tlora.scheduled(pipe, "dog_scheduled", num_inference_steps=25)
    image = pipe("a photo of sks dog", num_inference_steps=25, callback_on_step_end=step).images[0]

Each chunk holds the rank components that the T-LoRA schedule turns on below one timestep (the first
min_rank are always on). diffusers calls `callback_on_step_end` after each step, so the chunks for the
first step are set here, from the step count (and img2img strength), and again after the last step, ready
for the next call with the same settings; a call with other settings is refused after its first step.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.interop.export import SCHEDULE_NAME


class _NoTextEncoderKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextmanager
def _quiet_text_encoder_notice():
    """The chunks adapt the UNet only; diffusers says so twice per chunk (text encoders without keys)."""
    logger, quiet = logging.getLogger("diffusers.loaders.lora_base"), _NoTextEncoderKeys()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def first_timesteps(pipe, num_inference_steps: int, strength: float = 1.0):
    """The timesteps a pipeline will use: its scheduler's, cut as img2img/inpaint cut them for `strength`."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    return scheduler.timesteps[start * scheduler.order:].tolist()


class ScheduledTLoRA:
    """`callback_on_step_end` that turns on exactly the chunks the T-LoRA mask has on at the next timestep."""

    def __init__(self, pipe, schedule: dict, timesteps: list[float], others: dict[str, float]) -> None:
        self.pipe, self.chunks, self.timesteps, self.others = pipe, schedule["chunks"], timesteps, others
        self.apply(timesteps[0])

    def active(self, t: float) -> list[str]:
        return [c["adapter"] for c in self.chunks if t < c["on_below"]]

    def apply(self, t: float) -> None:
        names = self.active(t) + list(self.others)
        self.pipe.set_adapters(names, [1.0] * (len(names) - len(self.others)) + list(self.others.values()))

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step >= len(self.timesteps) or float(timestep) != float(self.timesteps[step]):
            raise UsageError(f"tlora.scheduled was set up for timesteps {self.timesteps[:3]}...; this call is at "
                             f"{float(timestep)} at step {step}: pass the same num_inference_steps (and strength)")
        following = self.timesteps[step + 1] if step + 1 < len(self.timesteps) else self.timesteps[0]
        if self.active(following) != self.active(float(timestep)) or step + 1 == len(self.timesteps):
            self.apply(following)
        return callback_kwargs


def scheduled(pipe, folder: str | Path, num_inference_steps: int = 50, strength: float = 1.0,
              other_adapters: dict[str, float] | None = None) -> ScheduledTLoRA:
    """Load a `--format diffusers-scheduled` export with `pipe.load_lora_weights` and return the callback.

    `other_adapters` (name -> weight) are other LoRAs to keep active beside the T-LoRA's chunks.
    """
    folder = Path(folder)
    try:
        schedule = json.loads((folder / SCHEDULE_NAME).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder} is not a diffusers-scheduled export ({err})") from None
    loaded = set(pipe.get_list_adapters().get("unet", []))
    with warnings.catch_warnings(), _quiet_text_encoder_notice():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # many adapters: the point
        for chunk in schedule["chunks"]:
            if chunk["adapter"] not in loaded:
                pipe.load_lora_weights(str(folder), weight_name=chunk["file"], adapter_name=chunk["adapter"])
    return ScheduledTLoRA(pipe, schedule, first_timesteps(pipe, num_inference_steps, strength), other_adapters or {})
