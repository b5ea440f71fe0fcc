"""Which samples each rank sees at each step: a pure function of (seed, epoch, position), so runs resume exactly.

Every epoch has one global order (a seeded permutation). Optimizer step s of an epoch consumes the `G`
consecutive entries order[s·G : (s+1)·G], where G = micro_batch × accumulation × world_size is the global
batch; micro-batch m of rank r takes entries [(m·world + r)·b, +b) of that slice. The ranks' shares are
disjoint (DistributedSampler semantics), and the data a step sees depends only on G, not on how it is split
across ranks and micro-batches: a run resumed on a different number of ranks with the same global batch
continues at exactly the right sample. The last partial global batch of an epoch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class DataPosition:
    """Where the data stream stands: `epoch` and how many samples of its order were consumed."""

    epoch: int = 0
    offset: int = 0


class StepBatchSampler:
    """Yields this rank's micro-batches of indices, step after step, from a position; for `batch_sampler=`."""

    def __init__(self, n: int, micro_batch: int, accumulation: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, start: DataPosition | None = None, steps: int | None = None):
        self.n, self.b, self.accum, self.world, self.rank = n, micro_batch, accumulation, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * accumulation * world_size
        self.steps_per_epoch = n // self.global_batch
        self.start = start or DataPosition()
        self.steps = steps  # how many steps to yield (None = forever)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = self.start.epoch, self.start.offset
        order = self.order(epoch)
        done = 0
        while self.steps is None or done < self.steps:
            if offset + self.global_batch > self.n:  # epoch exhausted: next permutation
                epoch, offset = epoch + 1, 0
                order = self.order(epoch)
            for m in range(self.accum):
                lo = offset + (m * self.world + self.rank) * self.b
                yield order[lo : lo + self.b].tolist()
            offset += self.global_batch
            done += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler has no length")
        return self.steps * self.accum

    def advance(self, position: DataPosition) -> DataPosition:
        """The position after one more optimizer step from `position`."""
        epoch, offset = position.epoch, position.offset
        if offset + self.global_batch > self.n:
            epoch, offset = epoch + 1, 0
        return DataPosition(epoch, offset + self.global_batch)
