"""Which checkpoint to resume from (`--resume_from_checkpoint` PATH or latest), and whether it may be: the newest of
its run (see `resumable`), whole (runs.checkpoint_state.why_not_resumable), trained with as many processes on the
same data, and the run's settings unchanged where they matter. All before any model loads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.common.messages import RUN_WRITABLE, note
from tlora.common.values import shown
from tlora.runs.checkpoint_state import PROGRESS_NAME, RESUME_DIR, NotResumable, read_progress, why_not_resumable
from tlora.runs.run_folder import RUN_INDEX, RunFolder, checkpoint_step
from tlora.train.checks import training_items
from tlora.train.loss_log import read_loss_log

# May differ from the run's hparams.yml when resuming; every other recorded setting must match.
MAY_CHANGE = frozenset({
    "num_train_epochs", "checkpointing_steps", "validation_prompts", "num_val_imgs_per_prompt", "validation_height",
    "validation_width", "validation_num_frames", "project_name",
    "wandb_api_key", "report_to", "checkpoints_total_limit", "resume_state_total_limit", "resume_from_checkpoint",
    "config", "output_dir", "dataloader_num_workers", "gradient_checkpointing", "allow_tf32", "compile",
    "train_data_dir", "class_data_dir", "mask_dir",  # the data itself is compared through data_sha256
    "tlora",  # folded into trainer_class
    "argv", "exp_name", "logging_dir", "resumed", "wandb_run_id",
})
PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path")


def resolve_output_dir(args: argparse.Namespace) -> None:
    """With --resume_from_checkpoint PATH, --output_dir may be left out: it is the run's parent folder."""
    value = args.resume_from_checkpoint
    if not args.output_dir and value and value != "latest":
        run = RunFolder.holding(Path(value))
        args.output_dir = str((run.path if run else Path(value)).absolute().parent)


def _hparams(run: RunFolder) -> dict | None:
    """A run's hparams.yml while looking for the latest run; None (with a note) for one that cannot be read."""
    try:
        return run.hparams()
    except UsageError as err:
        note(f"--resume_from_checkpoint latest: passing over {run.name}: {err}")
        return None


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


def or_new_run(fix: str) -> str:
    """A fix for a run that cannot be resumed as asked, with the other way out: starting over."""
    return f"{fix}, or start a new run"


def resumable(checkpoint: Path) -> Path:
    """`checkpoint` when it is the newest checkpoint of its run and can be resumed exactly; else one line. Resuming
    an older checkpoint would write the newer ones again, so a finished checkpoint is never replaced."""
    run = RunFolder(checkpoint.parent)
    newest = run.checkpoints()[-1][1]
    if newest != checkpoint:
        why = why_not_resumable(newest)
        if why is None:
            raise UsageError(f"--resume_from_checkpoint: {newest.name} of {run} is newer; "
                             f"{or_new_run('resume from it (or from the run folder)')}")
        raise UsageError(f"--resume_from_checkpoint: {newest.name} of {run} is newer but cannot be resumed ({why}); "
                         f"resuming {checkpoint.name} would write {newest.name} again: move {newest.name} out of the "
                         "run folder, then resume")
    problem = why_not_resumable(checkpoint)
    if problem is not None:
        older = next((p for _, p in reversed(run.checkpoints()[:-1]) if why_not_resumable(p) is None), None)
        fix = (or_new_run(f"move {checkpoint.name} out of {run} to resume from {older.name}") if older
               else "no other checkpoint of this run can be resumed: start a new run")
        raise UsageError(f"--resume_from_checkpoint: {problem}; {fix}")
    return checkpoint


def _newest(run: RunFolder) -> Path:
    """The newest checkpoint of a run folder, which must be resumable."""
    found = run.checkpoints()
    if not found:
        raise UsageError(f"--resume_from_checkpoint: {run.path} has no checkpoint yet; start a new run")
    return resumable(found[-1][1])


def _latest(args: argparse.Namespace) -> Path | None:
    """The newest checkpoint of the newest run in --output_dir with these settings that has one; None (with a
    note) when there is none."""
    out = Path(args.output_dir)
    runs = [RunFolder(p) for p in out.iterdir() if p.is_dir() and RUN_INDEX.match(p.name)] if out.is_dir() else []
    other = None
    for run in sorted(runs, key=lambda run: int(RUN_INDEX.match(run.name).group(1)), reverse=True):
        recorded = _hparams(run)
        if recorded is None:
            continue
        change = changed_setting(recorded, args)
        if change is not None:
            other = other or f"{run.name} has {change[0]} = {shown(change[1])}, not {shown(change[2])}"
            continue
        if run.checkpoints():
            return _newest(run)
    why = f" with these settings ({other})" if other else ""
    note(f"--resume_from_checkpoint latest: no run to resume in {out}{why}; starting a new run")
    return None


def find(args: argparse.Namespace) -> Path | None:
    """The checkpoint to resume from (None: start a new run). UsageError when PATH cannot be resumed."""
    value = args.resume_from_checkpoint
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
    run = RunFolder.holding(path)
    if run is not None:
        return _newest(run) if run.path == path else resumable(path)
    raise UsageError(f"--resume_from_checkpoint: {value} is neither a checkpoint-N folder of a run, a run folder nor "
                     "'latest'; pass one of them")


def check(args: argparse.Namespace) -> None:
    """Set args.resume_checkpoint and fail in one line when the run's settings differ in a way that matters."""
    args.resume_checkpoint = find(args)
    if args.resume_checkpoint is None:
        return
    run = RunFolder(args.resume_checkpoint.parent)
    run.lock().check()
    if not os.access(run.path, os.W_OK | os.X_OK):
        raise UsageError(f"--resume_from_checkpoint: cannot write in {run}; {RUN_WRITABLE} and resume there")
    progress = args.resume_checkpoint / RESUME_DIR / PROGRESS_NAME
    try:
        _, orders = read_progress(progress)
    except NotResumable as err:  # checked by find(); read again here for its counts
        raise UsageError(f"--resume_from_checkpoint: {err}; {or_new_run('resume from another checkpoint')}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(orders) != world:
        raise UsageError(f"--resume_from_checkpoint: {run.name} was trained with {len(orders)} processes, not "
                         f"{world}; resume with {len(orders)} processes")
    per_pass = -(-training_items(args) // args.train_batch_size)
    if any(order["taken"] > per_pass for order in orders):
        fix = or_new_run("resume with the run's data")
        raise UsageError(f"--resume_from_checkpoint: {progress} counts more batches than a pass over the data has "
                         f"({per_pass}); {fix}")
    read_loss_log(run.loss_log)  # readable, before any model loads
    change = changed_setting(run.hparams(), args)
    if change is not None:
        key, recorded, current = change
        fix = or_new_run("resume with the run's settings (only the step count, checkpointing, validation and "
                         "tracking may change)")
        raise UsageError(f"--resume_from_checkpoint: {run.name} was trained with {key} = {shown(recorded)}, not "
                         f"{shown(current)}; {fix}")
    step = checkpoint_step(args.resume_checkpoint)
    if args.num_train_epochs < step:
        raise UsageError(f"--num_train_epochs ({args.num_train_epochs}) is below the step of "
                         f"{args.resume_checkpoint.name}; pass at least {step}")


