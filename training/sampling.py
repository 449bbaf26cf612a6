"""Samplers for the training DataLoader. All are seeded by (seed, epoch), shard themselves over DDP ranks the
same way (rank r takes positions r, r + W, r + 2W, ... of one global order), and yield ``(index, epoch)`` pairs so
that the dataset can seed each sample's augmentation without relying on worker state (persistent workers keep
their own copy of the dataset, so ``dataset.set_epoch`` would never reach them).

- ``EpochShuffleSampler``: a permutation of all images per epoch (the paper: plain shuffling). The global order is
  identical to ``torch.utils.data.DistributedSampler``'s (randperm seeded with seed + epoch, padded by wrapping).
- ``ClassAwareSampler`` (beyond the paper; Shen et al. 2016): each draw picks a class uniformly, then an image
  uniformly among that class's known positives. Images positive for no label form one extra class ("no finding"),
  so negatives keep being seen. Draws with replacement, ``len(dataset)`` draws per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLERS = ("none", "class_aware")


class _ShardedEpochSampler(Sampler[tuple[int, int]]):
    def __init__(self, n_global: int, seed: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.per_rank = math.ceil(n_global / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order()
        total = self.per_rank * self.world_size
        if len(order) < total:  # pad by wrapping, as DistributedSampler does
            order = np.concatenate([order, order[: total - len(order)]])
        return iter([(int(i), self.epoch) for i in order[self.rank : total : self.world_size]])


class EpochShuffleSampler(_ShardedEpochSampler):
    """Seeded per-epoch permutation of ``range(n)``, sharded over ranks."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        super().__init__(n, seed, rank, world_size)
        self.n, self.shuffle = n, shuffle

    def global_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).numpy()


class ClassAwareSampler(_ShardedEpochSampler):
    """Class-aware sampling over an (N, L) label matrix (NaN = unknown, never counted as positive)."""

    def __init__(self, labels: np.ndarray, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        y = np.asarray(labels)
        super().__init__(len(y), seed, rank, world_size)
        positive = y == 1
        self.pools = [np.flatnonzero(positive[:, j]) for j in range(y.shape[1])]
        self.pools.append(np.flatnonzero(~positive.any(axis=1)))
        self.pools = [p for p in self.pools if len(p)]
        if not self.pools:
            raise ValueError("class-aware sampling needs at least one image")
        self.n = len(y)

    def global_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = rng.integers(0, len(self.pools), size=self.n)
        return np.array([self.pools[c][rng.integers(0, len(self.pools[c]))] for c in classes], dtype=np.int64)


def make_sampler(kind: str, labels: np.ndarray, seed: int, rank: int = 0, world_size: int = 1) -> _ShardedEpochSampler:
    """Training sampler by name (``none``: shuffling; ``class_aware``). Raises ValueError for others."""
    if kind == "none":
        return EpochShuffleSampler(len(labels), seed, rank, world_size)
    if kind == "class_aware":
        return ClassAwareSampler(labels, seed, rank, world_size)
    raise ValueError(f"unknown sampler {kind!r}; known: {SAMPLERS}")
