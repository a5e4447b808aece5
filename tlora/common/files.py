"""Files written whole or not at all, with the mode the umask gives; a failed write said in words."""

from __future__ import annotations

import errno
import os
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


def write_failure(err: BaseException, folder: str | Path) -> str:
    """Why writing into `folder` failed, in words: "the disk holding <folder> is full" for a full disk, however
    the writer reported it (an OSError with ENOSPC, or torch's "file write failed"), else the system's reason."""
    folder = Path(folder)
    if isinstance(err, OSError) and err.errno in FULL:
        return f"the disk holding {folder} is full"
    existing = next((p for p in [folder, *folder.absolute().parents] if p.exists()), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE:
        return f"the disk holding {folder} is full ({free >> 20} MiB free)"
    reason = err.strerror if isinstance(err, OSError) and err.strerror else "the write failed"
    return f"cannot write in {folder} ({reason})"
