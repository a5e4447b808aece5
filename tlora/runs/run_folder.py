"""A run folder as one value: `<output_dir>/<NNNNN>-<hex>-<data>_<t?><type><rank>/` with its logs/hparams.yml, its
loss log, its checkpoint-N folders and its lock; and the one resolver from whatever path a user gives (a run, one
of its checkpoints, a weights file) to the checkpoint it means. Every command finds runs and checkpoints here."""

from __future__ import annotations

import argparse
import atexit
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from tlora.common.errors import CheckpointError, UsageError
from tlora.common.files import atomic_write
from tlora.common.messages import PASS_HPARAMS, RUN_WRITABLE, WRITABLE_FOLDER, note
from tlora.common.redaction import redact_value, secret_values
from tlora.common.safe_names import safe_component
from tlora.common.text_files import load_yaml, read_text
from tlora.common.values import shown
from tlora.runs.hparams import from_hparams, to_hparams
from tlora.runs.weights import AUTHORS_FLUX_NAME, DAMAGED, WEIGHTS_NAME, WEIGHTS_NAMES, read_header, what_it_is

RUN_INDEX = re.compile(r"^([0-9]+)-")
CHECKPOINT = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")  # as training names them: no sign, no leading 0
INTERNAL = ("resume_checkpoint",)  # set while parsing, not an option: never recorded
LOCK_NAME = ".tlora.lock"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def checkpoint_step(checkpoint: Path) -> int:
    """N of a checkpoint-N folder."""
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


@dataclass(frozen=True)
class RunFolder:
    """One run folder: where its records are (every path inside a run is built here)."""

    path: Path

    def __str__(self) -> str:  # in messages, a run is its path
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def hparams_path(self) -> Path:
        return self.logs / "hparams.yml"

    @property
    def loss_log(self) -> Path:
        return self.logs / "loss.csv"

    def lock(self) -> RunLock:
        """A new lock object for the run (it knows whether it holds the lock once it has acquired it)."""
        return RunLock(self.path)

    def checkpoint(self, step: int | str) -> Path:
        return self.path / checkpoint_name(int(step))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint-N folder, oldest first."""
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
        return sorted(found)

    def hparams(self) -> dict:
        return read_hparams(self.hparams_path)

    def newest_usable(self) -> Path | None:
        """The weights of the newest checkpoint-N whose weights are a regular file with a readable header; a newer
        one passed over is said in a note naming why. None when the run has no checkpoint-N folder; one line
        (CheckpointError) when it has some but none is usable."""
        passed: list[tuple[Path, str]] = []
        for _, folder in reversed(self.checkpoints()):
            try:
                weights = usable_weights(folder)
            except CheckpointError as err:
                passed.append((folder, str(err)))
                continue
            if passed:
                newer, why = passed[0]
                others = f" (and {len(passed) - 1} more)" if len(passed) > 1 else ""
                note(f"{self.path}: using {folder.name}, the newest usable checkpoint; passed over "
                     f"{newer.name}{others}: {why}")
            return weights
        if passed:
            newest, why = passed[0]
            raise CheckpointError(f"no usable checkpoint in {self.path}: the newest, {newest.name}: {why} (or pass an "
                                  "older checkpoint-N folder)")
        return None

    def moved_from(self, hparams: dict) -> str | None:
        """The output_dir the run's hparams.yml records when the run is no longer there (moved or copied); None when
        it is where it was written."""
        recorded = str(hparams.get("output_dir") or "")
        if not recorded:
            return None
        try:
            return None if Path(recorded).exists() and Path(recorded).samefile(self.path) else recorded
        except OSError:
            return recorded

    @staticmethod
    def at(folder: Path) -> RunFolder | None:
        """The run `folder` is (judged by its logs/hparams.yml), else None."""
        run = RunFolder(Path(folder))
        return run if run.hparams_path.is_file() else None

    @staticmethod
    def holding(folder: Path) -> RunFolder | None:
        """The run a folder belongs to: itself, or the run holding it as checkpoint-N; None for a folder outside any
        run (a checkpoint copied alone)."""
        folder = Path(folder)
        if CHECKPOINT.match(folder.name) and (run := RunFolder.at(folder.parent)):
            return run
        return RunFolder.at(folder)


# -- from a path a user gives to the checkpoint it means ---------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """What a path means: its run (None for a checkpoint or file outside any run), the checkpoint folder (None for a
    run with no checkpoint yet) and the weights file (None likewise)."""

    run: RunFolder | None
    checkpoint: Path | None
    weights: Path | None


def weights_file(folder: str | Path) -> Path | None:
    """The weights file a checkpoint folder holds (ours or the authors' FLUX lora.pt), if any."""
    return next((Path(folder) / n for n in WEIGHTS_NAMES if (Path(folder) / n).is_file()), None)


def folder_weights(folder: Path) -> Path:
    """The weights file of one checkpoint folder (or of a run folder that holds its weights itself), which must
    be a regular file: one line (CheckpointError) naming it otherwise. Never another folder's."""
    for name in WEIGHTS_NAMES:
        path = folder / name
        if path.is_file():
            return path
        if path.exists() or path.is_symlink():
            raise CheckpointError(f"{path} is {what_it_is(path)}, not a weights file; {DAMAGED}")
    raise CheckpointError(f"no T-LoRA weights in {folder}: pass a run folder, a checkpoint-N folder, or its "
                          f"{WEIGHTS_NAME} (the authors' FLUX runs: {AUTHORS_FLUX_NAME})")


def usable_weights(folder: Path) -> Path:
    """folder_weights, with its header read and checked (a damaged file is one line)."""
    weights = folder_weights(folder)
    read_header(weights)
    return weights


PASS_CHECKPOINT = "pass a run folder, a checkpoint-N folder or a weights file"


def resolve(path: str | Path) -> Reference:
    """The checkpoint a path means: a weights file is itself; a folder that holds weights, or a checkpoint-N folder,
    is that folder's weights (one line when they are missing or damaged, never another folder's); a run folder is
    its newest usable checkpoint (see RunFolder.newest_usable), or no checkpoint when it has none yet."""
    path = Path(path)
    try:
        return _resolve(path)
    except OSError as err:  # a name too long for the system, a loop of links, a folder that cannot be listed
        raise CheckpointError(f"cannot read {shown(str(path))} ({err.strerror}); {PASS_CHECKPOINT}") from None


def _resolve(path: Path) -> Reference:
    if path.is_file():
        return Reference(RunFolder.holding(path.parent), path.parent, path)
    if not path.is_dir():
        what = f"is {what_it_is(path)}" if path.exists() or path.is_symlink() else "does not exist"
        raise CheckpointError(f"{path} {what}; {PASS_CHECKPOINT}")
    holds = any((path / n).exists() or (path / n).is_symlink() for n in WEIGHTS_NAMES)
    run = RunFolder.holding(path)
    if holds or CHECKPOINT.match(path.name):
        return Reference(run, path, folder_weights(path))  # one line when they are missing or damaged
    weights = (run or RunFolder(path)).newest_usable()  # a run folder, or a copy of one without its logs/
    if weights is None and run is None:
        folder_weights(path)  # says that there are no weights
    return Reference(run, weights.parent if weights else None, weights)


def find_weights(path: str | Path) -> Path:
    """The weights file a path means (see resolve); one line when it means none (a run with no checkpoint yet)."""
    found = resolve(path)
    return found.weights if found.weights is not None else folder_weights(Path(path))


def read_hparams(path: str | Path) -> dict:
    """A run's hparams.yml (ours or the authors'), as a dict of option names."""
    values = load_yaml(read_text(path, str(path), PASS_HPARAMS), str(path), PASS_HPARAMS) or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise UsageError(f"{path} is not a mapping of option names; {PASS_HPARAMS}")
    return values


# -- making and recording a run --------------------------------------------------------------------------------
def next_run_index(output_dir: Path) -> int:
    """One more than the highest run index in output_dir (1 for an empty folder)."""
    indices = [int(m.group(1)) for p in output_dir.iterdir() if (m := RUN_INDEX.match(p.name))]
    return max(indices, default=0) + 1


def run_name(args: argparse.Namespace, index: int) -> str:
    """`<index>-<4 hex>-<data folder>_<t if masked><trainer type><rank>`, as the authors' SDXL tool names runs."""
    data = safe_component(os.path.basename(os.path.normpath(os.path.abspath(args.train_data_dir))), 60)
    settings = from_hparams(vars(args), "train.py")
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
            RunFolder(folder).logs.mkdir()
            return folder
    except OSError as err:
        raise UsageError(f"--output_dir: cannot create a run folder in {output_dir} ({err.strerror}); "
                         f"{WRITABLE_FOLDER}") from None
    raise RuntimeError(f"could not create a new run folder in {output_dir}")


def remove_run_folder(folder: Path) -> None:
    """Remove a run folder that a failure left before its first step (never one that holds a checkpoint)."""
    if folder.is_dir() and not RunFolder(folder).checkpoints():
        shutil.rmtree(folder, ignore_errors=True)


def public_hparams(args: argparse.Namespace) -> dict:
    """Every option, with secrets removed however they were given: what hparams.yml and trackers receive.
    The T-LoRA settings are written by runs.hparams.to_hparams (on FLUX with the authors' keys tlora and rank too)."""
    hidden = secret_values(list(getattr(args, "argv", []))) | ({args.wandb_api_key} if args.wandb_api_key else set())
    values = {k: v for k, v in vars(args).items() if k not in INTERNAL}
    values |= to_hparams(from_hparams(values, "train.py"))
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
    args.logging_dir = str(RunFolder(folder).logs)
    path = RunFolder(folder).hparams_path
    atomic_write(path, yaml.safe_dump(public_hparams(args), sort_keys=True).encode())
    return path


def record_run(args: argparse.Namespace, folder: Path, resumed_step: int | None, wandb: bool) -> Path:
    """Write hparams.yml for a new run, or rewrite it for a run resumed at `resumed_step` (its first argv
    kept, a `resumed` entry added). A W&B run id is made once and kept, so a resumed run logs to the same
    W&B run."""
    recorded = {}
    if resumed_step is not None:
        recorded = RunFolder(folder).hparams()
        args.resumed = list(recorded.get("resumed") or []) + [{"from_step": resumed_step, "argv": list(args.argv)}]
        args.argv = recorded.get("argv", args.argv)
    args.wandb_run_id = recorded.get("wandb_run_id") or (secrets.token_hex(4) if wandb else None)
    return write_hparams(args, folder)



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
                raise UsageError(f"{flag}: cannot write in {self.path.parent} ({err.strerror or err}); "
                                 f"{RUN_WRITABLE}") from None
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
