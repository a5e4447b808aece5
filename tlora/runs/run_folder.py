"""The run folder (`<output_dir>/<NNNNN>-<hex>-<data>_<t?><type><rank>/`), its checkpoint-N folders and its
logs/hparams.yml."""

from __future__ import annotations

import argparse
import atexit
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import yaml

from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.safe_names import safe_component
from tlora.common.usage import load_yaml, read_text, redact_value, secret_values
from tlora.method.settings import TLoRASettings

RUN_INDEX = re.compile(r"^(\d+)-")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
INTERNAL = ("resume_checkpoint",)  # set while parsing, not an option: never recorded


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run).iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found)


def run_of(folder: Path) -> Path | None:
    """The run folder a folder belongs to (itself, or the run holding it as checkpoint-N), judged by the
    run's logs/hparams.yml; None for a folder outside any run (a checkpoint copied alone)."""
    folder = Path(folder)
    for run in (folder, folder.parent) if CHECKPOINT.match(folder.name) else (folder,):
        if (run / "logs" / "hparams.yml").is_file():
            return run
    return None


HPARAMS_FIX = "pass a run's logs/hparams.yml"


def read_hparams(path: str | Path) -> dict:
    """A run's hparams.yml (ours or the authors'), as a dict of option names."""
    values = load_yaml(read_text(path, str(path), HPARAMS_FIX), str(path), HPARAMS_FIX) or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise UsageError(f"{path} is not a mapping of option names; {HPARAMS_FIX}")
    return values


def next_run_index(output_dir: Path) -> int:
    """One more than the highest run index in output_dir (1 for an empty folder)."""
    indices = [int(m.group(1)) for p in output_dir.iterdir() if (m := RUN_INDEX.match(p.name))]
    return max(indices, default=0) + 1


def run_name(args: argparse.Namespace, index: int) -> str:
    """`<index>-<4 hex>-<data folder>_<t if masked><trainer type><rank>`, as the authors' SDXL tool names runs."""
    data = safe_component(os.path.basename(os.path.normpath(os.path.abspath(args.train_data_dir))), 60)
    settings = TLoRASettings.from_hparams(vars(args), "train.py")
    t = "t" if settings.timestep_dependent else ""
    return f"{index:05d}-{secrets.token_hex(2)}-{data}_{t}{settings.trainer_type}{settings.lora_rank}"


def create_run_folder(args: argparse.Namespace) -> Path:
    """Make a new, empty run folder; never reuses an existing one."""
    output_dir = Path(args.output_dir).absolute()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            folder = output_dir / run_name(args, next_run_index(output_dir))
            try:
                folder.mkdir()
            except FileExistsError:  # another run took this name a moment ago
                continue
            (folder / "logs").mkdir()
            return folder
    except OSError as err:
        raise UsageError(f"--output_dir: cannot create a run folder in {output_dir} ({err.strerror}); "
                         "pass a folder you can write to") from None
    raise RuntimeError(f"could not create a new run folder in {output_dir}")


def remove_run_folder(folder: Path) -> None:
    """Remove a run folder that a failure left before its first step (never one that holds a checkpoint)."""
    if folder.is_dir() and not any(folder.glob("checkpoint-*")):
        shutil.rmtree(folder, ignore_errors=True)


def public_hparams(args: argparse.Namespace) -> dict:
    """Every option, with secrets removed however they were given: what hparams.yml and trackers receive.
    The T-LoRA settings are written by TLoRASettings (on FLUX with the authors' keys tlora and rank too)."""
    hidden = secret_values(list(getattr(args, "argv", []))) | ({args.wandb_api_key} if args.wandb_api_key else set())
    values = {k: v for k, v in vars(args).items() if k not in INTERNAL}
    values |= TLoRASettings.from_hparams(values, "train.py").to_hparams()
    values["wandb_api_key"] = None

    def clean(value):  # by exact value: a setting that merely contains the key's characters is kept
        if isinstance(value, str):
            return redact_value(value, hidden)
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return {k: clean(v) for k, v in values.items()}


def write_hparams(args: argparse.Namespace, folder: Path) -> Path:
    """Record the run: every option plus exp_name, output_dir (= the run folder), logging_dir, argv."""
    args.exp_name = folder.name
    args.output_dir = str(folder)
    args.logging_dir = str(folder / "logs")
    path = folder / "logs" / "hparams.yml"
    atomic_write(path, yaml.safe_dump(public_hparams(args), sort_keys=True).encode())
    return path


def record_run(args: argparse.Namespace, folder: Path, resumed_step: int | None, wandb: bool) -> Path:
    """Write hparams.yml for a new run, or rewrite it for a run resumed at `resumed_step` (its first argv
    kept, a `resumed` entry added). A W&B run id is made once and kept, so a resumed run logs to the same
    W&B run."""
    recorded = {}
    if resumed_step is not None:
        recorded = read_hparams(folder / "logs" / "hparams.yml")
        args.resumed = list(recorded.get("resumed") or []) + [{"from_step": resumed_step, "argv": list(args.argv)}]
        args.argv = recorded.get("argv", args.argv)
    args.wandb_run_id = recorded.get("wandb_run_id") or (secrets.token_hex(4) if wandb else None)
    return write_hparams(args, folder)


LOCK_NAME = ".tlora.lock"


class RunLock:
    """One training process group per run folder: `<run>/.tlora.lock` holds "<pid> <host>", made with O_EXCL,
    removed when training ends (and at exit); a lock whose process is gone (same host) is stale and taken over."""

    def __init__(self, run: Path) -> None:
        self.path, self.held = Path(run) / LOCK_NAME, False

    def holder(self) -> str | None:
        """"pid <pid> on <host>" of a live holder; None when free or stale."""
        try:
            pid, host = self.path.read_text().split()
        except (OSError, ValueError):
            return None
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return None
            except (PermissionError, ValueError):
                pass
        return f"process {pid} on {host}"

    def check(self, flag: str = "--resume_from_checkpoint") -> None:
        """Refuse, in one line, a run that another process is training."""
        holder = self.holder()
        if holder is not None and not self.held:
            raise UsageError(f"{flag}: {self.path.parent} is being trained by {holder}; wait for it to end "
                             f"(or delete {self.path} if that process is gone)")

    def acquire(self, flag: str = "--resume_from_checkpoint") -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check(flag)
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as err:  # a read-only folder or disk
                raise UsageError(f"{flag}: cannot write in {self.path.parent} ({err.strerror or err}); make it "
                                 "writable (or copy the run to a folder you can write to)") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            atexit.register(self.release)
            return self
        raise UsageError(f"{flag}: could not lock {self.path.parent}; delete {self.path} and try again")

    def release(self) -> None:
        if self.held:
            self.held = False
            atexit.unregister(self.release)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # the folder became read-only: the lock is stale once this process is gone
                pass


def moved_from(run: Path, hparams: dict) -> str | None:
    """The output_dir a run's hparams.yml records when the run is no longer there (moved or copied); None when
    it is where it was written."""
    recorded = str(hparams.get("output_dir") or "")
    if not recorded:
        return None
    try:
        return None if Path(recorded).exists() and Path(recorded).samefile(run) else recorded
    except OSError:
        return recorded
