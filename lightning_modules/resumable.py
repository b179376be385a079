"""A training DataLoader that resumes mid-epoch exactly where a checkpoint left it.

Lightning restarts a plain DataLoader at the top of its epoch when a run
resumes from a checkpoint saved mid-epoch (at a validation, or at
preemption), so the resumed run sees some batches of that epoch twice and
others not at all. A DataLoader with `state_dict` / `load_state_dict`
(Lightning's `_Stateful`) has its state saved in every checkpoint and
restored before the loader is iterated again. `ResumableDataLoader` keeps the
sampler's epoch and the batches handed out in it; after a restore it sets the
epoch and skips those batches by index (nothing is loaded for them). With a
sampler whose order depends only on its epoch (`data.SeededShuffle`, also
under Lightning's distributed wrapper), the resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A DataLoader (same arguments) whose position in the epoch survives a checkpoint."""

    _handed_out = 0  # batches of the current pass handed to the consumer (skipped ones included)
    _skip = 0  # batches the next pass starts after (set by load_state_dict)

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(self, super()._index_sampler)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its first batch
            epoch, batches = epoch + 1, 0
        if hasattr(self.sampler, "set_epoch"):  # before workers draw indices, which Lightning's set_epoch is not
            self.sampler.set_epoch(epoch)
        self._skip = batches


class _SkipFirst:
    """A loader's batches of indices less the first `loader._skip`, taken when a pass starts drawing indices
    (a generator: DataLoader iterators call `iter()` on it more than once before drawing)."""

    def __init__(self, loader: ResumableDataLoader, batches: Any) -> None:
        self.loader, self.batches = loader, batches

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader._skip = self.loader._skip, 0
        self.loader._handed_out = skip
        yield from itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)
