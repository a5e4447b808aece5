"""Exact resume: which checkpoint to resume from, whether the settings allow it, and the resume state.

`checkpoint-N/` holds the unchanged `pytorch_lora_weights.safetensors` and, in the newest checkpoint(s),
`resume/`: accelerate's `save_state` (optimizer, grad scaler, the RNG states of every process) plus
`custom_checkpoint_0.pkl` (the `Progress`: step and every process's data order). Both are written into a
hidden staging folder that is renamed to `checkpoint-N` when complete, so a checkpoint folder is always
whole; pruning renames a folder away before deleting it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.runs.checkpoint_state import RESUME_DIR, checkpoint_step, damage, is_resumable, newest_whole
from tlora.runs.run_folder import CHECKPOINT, RunLock, checkpoints, read_hparams

RUN = re.compile(r"^(\d+)-")
# May differ from the run's hparams.yml when resuming; every other recorded setting must match.
MAY_CHANGE = frozenset({
    "num_train_epochs", "checkpointing_steps", "validation_prompts", "num_val_imgs_per_prompt", "project_name",
    "wandb_api_key", "report_to", "checkpoints_total_limit", "resume_state_total_limit", "resume_from_checkpoint",
    "config", "output_dir", "dataloader_num_workers", "gradient_checkpointing", "allow_tf32",
    "train_data_dir", "class_data_dir", "mask_dir",  # the data itself is compared through data_sha256
    "tlora",  # folded into trainer_class
    "argv", "exp_name", "logging_dir", "resumed", "wandb_run_id",
})
PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path")


def _run_of(value: str) -> Path:
    path = Path(value)
    return path.parent if CHECKPOINT.match(path.name) else path


def resolve_output_dir(args: argparse.Namespace) -> None:
    """With --resume_from_checkpoint PATH, --output_dir may be left out: it is the run's parent folder."""
    value = args.resume_from_checkpoint
    if not args.output_dir and value and value != "latest":
        args.output_dir = str(_run_of(value).absolute().parent)


def _hparams(run: Path) -> dict:
    """A run's hparams.yml, or {} for a folder whose record is missing or damaged."""
    try:
        return read_hparams(run / "logs" / "hparams.yml")
    except UsageError:
        return {}


def _same(key: str, recorded, current) -> bool:
    if recorded == current:
        return True
    if key in PATH_SETTINGS and recorded and current and os.path.exists(recorded) and os.path.exists(current):
        return os.path.samefile(recorded, current)
    return False


def changed_setting(recorded: dict, args: argparse.Namespace) -> tuple[str, object, object] | None:
    """The first setting that matters and differs between a run's hparams.yml and `args`."""
    for key in sorted(recorded):
        if key in MAY_CHANGE or not hasattr(args, key):
            continue
        if not _same(key, recorded[key], getattr(args, key)):
            return key, recorded[key], getattr(args, key)
    return None


def _latest(args: argparse.Namespace) -> Path | None:
    """The newest whole checkpoint of the newest run in --output_dir with these settings; None (and a note in
    args.resume_note) when there is none."""
    out = Path(args.output_dir)
    runs = [p for p in out.iterdir() if p.is_dir() and RUN.match(p.name)] if out.is_dir() else []
    other = None
    for run in sorted(runs, key=lambda p: int(RUN.match(p.name).group(1)), reverse=True):
        change = changed_setting(_hparams(run), args)
        if change is not None:
            other = other or f"{run.name} has {change[0]} = {change[1]!r}, not {change[2]!r}"
            continue
        found, skipped = newest_whole(run)
        if found is not None:
            args.resume_note = f"resuming {found}, the newest whole checkpoint: {'; '.join(skipped)}" if skipped \
                else None
            return found
    why = f" with these settings ({other})" if other else ""
    args.resume_note = f"--resume_from_checkpoint latest: no run to resume in {out}{why}; starting a new run"
    return None


def _checkpoint(path: Path) -> Path:
    """An explicit checkpoint-N: it must be the newest of its run with resume state, and whole."""
    if not is_resumable(path):
        raise UsageError(f"--resume_from_checkpoint: {path} has no resume state ({RESUME_DIR}/ and weights); pass "
                         "its run folder to resume from the newest complete checkpoint")
    newer = [p for step, p in checkpoints(path.parent) if is_resumable(p) and step > checkpoint_step(path)]
    if newer:
        raise UsageError(f"--resume_from_checkpoint: {newer[-1].name} of this run is newer; resume from it "
                         "(or from the run folder), or start a new run")
    problem = damage(path)
    if problem is not None:
        older = [p for _, p in reversed(checkpoints(path.parent)) if p != path and is_resumable(p) and not damage(p)]
        instead = f"resume from {older[0]} instead" if older else "no other checkpoint of this run has whole " \
                                                                  "resume state: start a new run"
        raise UsageError(f"--resume_from_checkpoint: {problem}; {instead}")
    return path


def find(args: argparse.Namespace) -> Path | None:
    """The checkpoint to resume from (None: start a new run). UsageError when PATH cannot be resumed."""
    value = args.resume_from_checkpoint
    args.resume_note = None
    if not value:
        return None
    if value == "latest":
        return _latest(args)
    path = Path(value)
    if not path.exists():
        raise UsageError(f"--resume_from_checkpoint: {path} does not exist; pass a checkpoint-N folder, a run folder "
                         "or latest")
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint: {path} is a file; pass its checkpoint-N folder or its run folder")
    if CHECKPOINT.match(path.name):
        return _checkpoint(path)
    if (path / "logs" / "hparams.yml").is_file():
        found, skipped = newest_whole(path)
        if found is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise UsageError(f"--resume_from_checkpoint: {path} has no checkpoint with whole resume state{why}; "
                             "start a new run")
        args.resume_note = f"resuming {found}, the newest whole checkpoint: {'; '.join(skipped)}" if skipped else None
        return found
    raise UsageError(f"--resume_from_checkpoint: {value} is neither a checkpoint-N folder, a run folder nor 'latest'; "
                     "pass one of them")


def check(args: argparse.Namespace) -> None:
    """Set args.resume_checkpoint and fail in one line when the run's settings differ in a way that matters."""
    args.resume_checkpoint = find(args)
    if args.resume_checkpoint is None:
        return
    run = args.resume_checkpoint.parent
    RunLock(run).check()
    change = changed_setting(_hparams(run), args)
    if change is not None:
        key, recorded, current = change
        raise UsageError(f"--resume_from_checkpoint: {run.name} was trained with {key} = {recorded!r}, not {current!r}; "
                         "resume with the run's settings (only the step count, checkpointing, validation and "
                         "tracking may change) or start a new run")
    step = checkpoint_step(args.resume_checkpoint)
    if args.num_train_epochs < step:
        raise UsageError(f"--num_train_epochs ({args.num_train_epochs}) is below the step of "
                         f"{args.resume_checkpoint.name}; pass at least {step}")


