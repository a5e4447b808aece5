"""The order training examples are drawn in: DreamBooth's instance/class pairing, and batches that resume
mid-pass exactly."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class PairedIndices(Dataset):
    """Index i pairs instance image i % n_instance with class image i % n_class (DreamBooth's pairing)."""

    def __init__(self, num_instance: int, num_class: int = 0) -> None:
        self.num_instance, self.num_class = num_instance, num_class

    def __len__(self) -> int:
        return max(self.num_instance, self.num_class)

    def __getitem__(self, i: int) -> dict[str, int]:
        item = {"instance": i % self.num_instance}
        if self.num_class:
            item["class"] = i % self.num_class
        return item


class BatchOrder:
    """Index batches for ever from a shuffling DataLoader, with a state that resumes mid-pass exactly.

    The state is the loader generator's state at the start of the current pass plus the batches taken
    from it; restoring it replays the pass's draws, so the next batch is the one an uninterrupted run gets.
    `fresh=True` starts a new pass for every batch (the authors' loop: a new iterator per step).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, fresh: bool = False) -> None:
        self.loader, self.fresh = loader, fresh
        self._start = loader.generator.get_state()
        self._taken = 0
        self._iterator = None

    def _new_pass(self) -> None:
        self._start = self.loader.generator.get_state()
        self._taken = 0
        self._iterator = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None or self.fresh:
            self._new_pass()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._new_pass()
            batch = next(self._iterator)
        self._taken += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": self._start.clone(), "taken": self._taken}

    def load_state_dict(self, state: dict) -> None:
        self.loader.generator.set_state(state["generator"])
        self._new_pass()
        for _ in range(state["taken"]):
            next(self._iterator)
        self._taken = state["taken"]
