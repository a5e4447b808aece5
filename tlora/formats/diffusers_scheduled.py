"""The `diffusers-scheduled` folder: standard diffusers LoRA files, each holding the rank components that the
T-LoRA schedule turns on below one timestep (the first min_rank are always on), and `schedule.json`: the chunks
(adapter name, file, and `file_2` for a second model's layers such as Wan 2.2's transformer_2; the components; the
timestep below which each is on) and the settings as our checkpoints' metadata holds them, with the T they count
timesteps in. tlora.scheduled switches the chunks per denoising step (tlora.generate.scheduled reads it back)."""

from __future__ import annotations

from pathlib import Path

import torch

from tlora.method.settings import TLoRASettings

SCHEDULE_NAME = "schedule.json"
RULE = ("a chunk is active at a whole timestep t when t < on_below; at any t, when its last component is below r(t) "
        "of `settings` (tlora.scheduled)")


def chunks(s: TLoRASettings) -> list[tuple[int, int, int]]:
    """(first, last + 1, t_on) per chunk of rank components: the first min_rank are always on (t_on = T + 1: at
    every t up to T, which flow-matching pipelines start at); the others grouped by the whole timestep below
    which the T-LoRA schedule turns them on."""
    T, rank = s.num_train_timesteps, s.lora_rank
    if not s.timestep_dependent:
        return [(0, rank, T + 1)]
    ranks = s.active_rank(torch.arange(T)).tolist()
    out, start = [], 0
    for end in sorted(set(ranks)):  # each distinct active count ends a chunk
        if end > start:  # r(t) falls as t grows: the chunk is on for t below the last t with r(t) >= end
            on_below = T + 1 if end <= s.min_rank else max(t for t in range(T) if ranks[t] >= end) + 1
            out.append((start, end, on_below))
            start = end
    return out


def entry(index: int, files: list[str], first: int, end: int, on_below: int) -> dict:
    """One chunk's record: its adapter name, its file (and a second model's), components and on_below."""
    second = {"file_2": files[1]} if len(files) > 1 else {}
    return {"adapter": f"tlora_chunk_{index:03d}", "file": files[0], **second, "components": [first, end],
            "on_below": on_below}


def file_names(index: int, suffixes: list[str]) -> list[str]:
    """The chunk's file names, one per model part (`chunk_000.safetensors`, `chunk_000_low_noise.safetensors`)."""
    return [f"chunk_{index:03d}{suffix}.safetensors" for suffix in suffixes]


def schedule(settings: TLoRASettings, entries: list[dict]) -> dict:
    """schedule.json's content."""
    return {"num_train_timesteps": settings.num_train_timesteps, "settings": settings.to_metadata(),
            "chunks": entries, "rule": RULE}


def is_schedule(value) -> bool:
    """What tlora.scheduled reads is there, and each chunk's file is a plain name inside the folder."""
    def plain(name) -> bool:
        return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name

    def chunk_ok(c) -> bool:
        return (isinstance(c, dict) and isinstance(c.get("adapter"), str) and plain(c.get("file"))
                and ("file_2" not in c or plain(c["file_2"]))
                and isinstance(c.get("components"), list)
                and len(c["components"]) == 2 and isinstance(c.get("on_below"), (int, float)))

    return (isinstance(value, dict) and isinstance(value.get("num_train_timesteps"), int)
            and isinstance(value.get("settings"), dict)
            and isinstance(value.get("chunks"), list) and len(value["chunks"]) > 0
            and all(map(chunk_ok, value["chunks"])))
