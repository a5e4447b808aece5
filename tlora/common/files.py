"""Files written whole or not at all, with the mode the umask gives; a failed write said in words."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
LOW_SPACE = 64 * 2**20  # a write that failed with less free space than this failed for want of space


def file_mode() -> int:
    """The mode a plainly created file gets under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: a crash never leaves half a file.
    The file gets the umask's mode, as open() would give it (mkstemp alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_os_error(err: BaseException) -> BaseException:
    """A writer's error as the OSError it reports (safetensors gives the system's error only in its text)."""
    found = None if isinstance(err, OSError) else re.search(r"os error (\d+)", str(err))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else err


def is_write_failure(err: BaseException) -> bool:
    """Whether a writer's error is the write itself failing (the disk, the folder), not a fault in the code: an
    OSError, or a writer that reports one in its own words (torch's "file write failed", safetensors' "os error")."""
    return isinstance(err, OSError) or "writ" in str(err) or "os error" in str(err)


def write_failure(err: BaseException, folder: str | Path) -> str:
    """Why writing into `folder` failed, in words: "the disk holding <folder> is full" for a full disk, however
    the writer reported it (ENOSPC, safetensors' "os error 28", torch's "file write failed" with no space left),
    else the system's reason."""
    folder, err = Path(folder), _as_os_error(err)
    if isinstance(err, OSError) and err.errno in FULL:
        return f"the disk holding {folder} is full"
    if isinstance(err, OSError) and err.errno:
        return f"cannot write in {folder} ({err.strerror})"
    existing = next((p for p in [folder, *folder.absolute().parents] if p.exists()), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE:
        return f"the disk holding {folder} is full ({free >> 20} MiB free)"
    return f"cannot write in {folder} (the write failed)"


def check_folder(flag: str, path: str | Path | None, fix: str) -> None:
    """`path` is a folder that exists: one line naming it otherwise (a file where the folder should be, or
    nothing there), ending in `fix`."""
    from tlora.common.errors import UsageError

    if path and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag}: {path} is a file, not a folder; {fix}")
    if not path or not Path(path).is_dir():
        raise UsageError(f"{flag}: folder {path} does not exist; {fix}")


def check_writable(folder: str | Path, what: str, fix: str) -> None:
    """Refuse, in one line, a folder that cannot be made or written in (read-only, under /proc, a file in the
    way), found by making a temporary file in the nearest folder above it that exists."""
    from tlora.common.errors import UsageError

    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{what}: {write_failure(err, existing)}; {fix}") from None
