"""The exact T-LoRA in stock diffusers: standard LoRA chunks switched per denoising step with set_adapters.

    python -m tlora.export RUN/checkpoint-800 --format diffusers-scheduled --out dog_scheduled
    step = tlora.scheduled(pipe, "dog_scheduled", num_inference_steps=25)
    image = pipe("a photo of sks dog", num_inference_steps=25, callback_on_step_end=step).images[0]

Each chunk holds the rank components that the T-LoRA schedule turns on below one timestep (the first
min_rank are always on). diffusers calls `callback_on_step_end` after each step: the callback turns on the
chunks that r(t) keeps at the scheduler's next timestep (its step index says which), and after the last
step the chunks for the first step again, ready for the next call. The first step's chunks are set here,
from the step count (and img2img strength); a call whose first step needs other chunks is refused after it.
Works with every family's pipelines (SDXL, FLUX.1, FLUX.2 [klein]) and any scheduler that counts its steps
(Euler, DPM-Solver, flow matching). Wan 2.2 A14B: each chunk is a file per expert (`file`, and `file_2` loaded into
transformer_2), switched together: both experts' masks follow the same t.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from tlora import families
from tlora.common.errors import UsageError
from tlora.common.text_files import parse_json, read_text
from tlora.common.values import check_count, check_finite
from tlora.formats.diffusers_scheduled import SCHEDULE_NAME, is_schedule
from tlora.method.settings import TLoRASettings
from tlora.runs.hparams import known_from_ours, settings_from_known

REEXPORT = "export the T-LoRA again with python -m tlora.export --format diffusers-scheduled"


class _NoTextEncoderKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextmanager
def _quiet_text_encoder_notice():
    """The chunks adapt the denoiser only; diffusers says so for every text encoder of every chunk."""
    logger, quiet = logging.getLogger("diffusers.loaders.lora_base"), _NoTextEncoderKeys()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def first_timestep(pipe, num_inference_steps: int, strength: float = 1.0) -> float:
    """The first timestep a pipeline will use: its scheduler's, cut as img2img/inpaint cut it for `strength`.
    Flow-matching schedulers that shift by image size start text-to-image at sigma 1 (t = T) whatever the shift."""
    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting", False):
        if strength != 1.0:
            raise UsageError("tlora.scheduled: with this flow-matching scheduler the first timestep of img2img depends "
                             "on the image size; use strength=1.0, or tlora.load for img2img")
        return float(config.num_train_timesteps)
    scheduler = type(pipe.scheduler).from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    return float(scheduler.timesteps[start * scheduler.order])


def next_timestep(scheduler) -> float | None:
    """The timestep of the scheduler's next step (after a step), None after the last."""
    index = scheduler.step_index
    return float(scheduler.timesteps[index]) if index is not None and index < len(scheduler.timesteps) else None


class ScheduledTLoRA:
    """`callback_on_step_end` that turns on exactly the chunks the T-LoRA mask has on at the next timestep."""

    def __init__(self, pipe, family: type[families.Family], chunks: list[dict], settings: TLoRASettings, first: float,
                 others: dict[str, float]) -> None:
        self.pipe, self.chunks, self.settings, self.first, self.others = pipe, chunks, settings, first, others
        self.family = family
        self.dtype = next(family.model(pipe).parameters()).dtype  # the latents' (FLUX casts the timestep to it)
        self.on = self.active(first)
        self.apply(self.on)

    def active(self, timestep: float) -> list[str]:
        """The chunks r(t) keeps at a scheduler timestep (t as the T-LoRA sees it: the family's scaling)."""
        rank = int(self.settings.active_rank(self.family.scheduler_t(timestep, self.dtype)))
        return [c["adapter"] for c in self.chunks if c["components"][1] <= rank]

    def apply(self, names: list[str]) -> None:
        self.pipe.set_adapters(names + list(self.others), [1.0] * len(names) + list(self.others.values()))

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step == 0 and self.active(float(timestep)) != self.on:
            raise UsageError(f"tlora.scheduled was set up for a first timestep of {self.first}; this call started at "
                             f"{float(timestep)}: pass the same num_inference_steps (and strength)")
        following = next_timestep(pipe.scheduler)
        wanted = self.active(self.first if following is None else following)
        if wanted != self.on:
            self.on = wanted
            self.apply(wanted)
        return callback_kwargs


def check_steps(num_inference_steps: int, strength: float) -> None:
    check_count("tlora.scheduled: num_inference_steps", num_inference_steps,
                "pass the steps the pipeline call will use")
    check_finite("tlora.scheduled: strength", strength, 0, 1, low_open=True)


def read_schedule(folder: Path) -> tuple[list[dict], TLoRASettings]:
    """The chunks and settings of a diffusers-scheduled export's schedule.json, checked (one line naming the file
    otherwise)."""
    path = folder / SCHEDULE_NAME
    text = read_text(path, "tlora.scheduled", "pass a folder written by python -m tlora.export --format "
                                              "diffusers-scheduled")
    try:
        schedule = parse_json(text)
    except ValueError:
        raise UsageError(f"{path} is not JSON; {REEXPORT}") from None
    if not is_schedule(schedule):
        raise UsageError(f"{path} is not a T-LoRA schedule (num_train_timesteps, settings, chunks of plain file "
                         f"names); {REEXPORT}")
    try:
        return schedule["chunks"], _settings(schedule, str(path))
    except UsageError as err:  # what is wrong, without the fix of a setting given by hand: the fix is to re-export
        raise UsageError(f"{path}: {str(err).removeprefix(f'{path}: ').partition('; ')[0]}; {REEXPORT}") from None


def _settings(schedule: dict, where: str) -> TLoRASettings:
    """The settings a schedule.json holds (as TLoRASettings.to_metadata wrote them), checked."""
    known = known_from_ours(schedule["settings"], where)
    missing = [k for k in ("family", "trainer_type", "lora_rank") if k not in known]
    if missing:
        raise UsageError(f"its settings have no {missing[0]}; {REEXPORT}")
    return settings_from_known(known | {"num_train_timesteps": schedule["num_train_timesteps"]})


def scheduled(pipe, folder: str | Path, num_inference_steps: int = 50, strength: float = 1.0,
              other_adapters: dict[str, float] | None = None) -> ScheduledTLoRA:
    """Load a `--format diffusers-scheduled` export with `pipe.load_lora_weights` and return the callback.

    `other_adapters` (name -> weight) are other LoRAs to keep active beside the T-LoRA's chunks.
    """
    check_steps(num_inference_steps, strength)
    folder = Path(folder)
    chunks, settings = read_schedule(folder)
    family = families.of_model(pipe)
    if settings.family != family.name:
        raise UsageError(f"{folder} is a {settings.family} T-LoRA; this is a {family.name} pipeline: load it on a "
                         "pipeline of its family")
    if not hasattr(pipe.scheduler, "step_index"):
        raise UsageError(f"tlora.scheduled needs a scheduler that counts its steps (Euler, DPM-Solver, flow matching); "
                         f"{type(pipe.scheduler).__name__} does not: use one of those, e.g. pipe.scheduler = "
                         "EulerDiscreteScheduler.from_config(pipe.scheduler.config)")
    two = getattr(pipe, "transformer_2", None) is not None
    if two != all("file_2" in chunk for chunk in chunks):
        raise UsageError(f"{folder} adapts {'one transformer' if two else 'two (transformer and transformer_2)'}; "
                         f"this pipeline has {'two' if two else 'one'}: load it on the model it was trained on (its "
                         "hparams.yml's pretrained_model_name_or_path)")
    loaded = set(pipe.get_list_adapters().get(family.model_attr, []))
    with warnings.catch_warnings(), _quiet_text_encoder_notice():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # many adapters: the point
        for chunk in chunks:
            if chunk["adapter"] not in loaded:
                pipe.load_lora_weights(str(folder), weight_name=chunk["file"], adapter_name=chunk["adapter"])
                if two:  # diffusers' WanLoraLoaderMixin: the same adapter name in the second expert
                    pipe.load_lora_weights(str(folder), weight_name=chunk["file_2"], adapter_name=chunk["adapter"],
                                           load_into_transformer_2=True)
    first = first_timestep(pipe, num_inference_steps, strength)
    return ScheduledTLoRA(pipe, family, chunks, settings, first, other_adapters or {})
