"""Memory-mapped checkpoint pages. diffusers and transformers load safetensors files through a read-only memory map:
a float32 model's tensors are the file's pages (no copy), and the pages read stay resident until the map goes.
Casting such a model tensor by tensor would keep every page read beside the cast copies; `FilePages.drop` gives a
cast tensor's old pages back to the kernel. Only pages of private file mappings are dropped: reading them again
re-reads the file (never zeros, as dropping anonymous memory would give); it is called only on tensors the model
no longer holds. Linux only; elsewhere it does nothing."""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

MADV_DONTNEED = 4


class FilePages:
    """The private file mappings of this process when made, and a way to drop pages that lie inside them."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        if not sys.platform.startswith("linux"):
            return
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[1].endswith("p") and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    self.ranges.append((start, end))
        libc = ctypes.CDLL(None, use_errno=True)
        self._madvise = libc.madvise
        self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def drop(self, tensor: torch.Tensor) -> bool:
        """Drop the whole pages of `tensor`'s storage if they lie in one private file mapping; True if dropped."""
        if self._madvise is None or tensor.device.type != "cpu":
            return False
        storage = tensor.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
        start = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (begin + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end <= start or not any(a <= start and end <= b for a, b in self.ranges):
            return False
        return self._madvise(start, end - start, MADV_DONTNEED) == 0
