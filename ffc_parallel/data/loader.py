"""Per-rank training batches from a shuffled epoch that is never materialised.

An epoch is a pseudo-random permutation of ``[0, num_items)`` (a keyed Feistel network with cycle
walking: a bijection computed position by position), so 100M items cost no memory. Global step
``s`` takes permutation positions ``[s * W * b, (s + 1) * W * b)``; rank ``r`` takes the ``r``-th
block of ``b`` of them. Every rank runs the same number of steps (the incomplete last global batch is
dropped), which the collectives of the sharded head need.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..distributed import streams

_ROUNDS = 6


class FeistelPermutation:
    """A bijection of ``[0, n)`` keyed by ``key``: ``perm(positions) -> items`` (vectorised, O(1) state)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n, self.key = int(n), int(key)
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for r in range(_ROUNDS):
            left, right = right, left ^ (streams.hash_keys(self.key, r, right) & self.mask)
        return (left << shift) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():  # cycle walking: re-encrypt until back inside [0, n)
            y[outside] = self._encrypt(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


class EpochBatches:
    """Index batches ``[batch_size]`` (int64 arrays) of one rank for one epoch.

    ``shuffle=False`` walks the items in order (positions = items). ``start_step`` skips the first
    steps (resuming inside an epoch).
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, *, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, start_step: int = 0):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.num_items, self.batch_size, self.rank, self.world_size = num_items, batch_size, rank, world_size
        self.steps = num_items // (batch_size * world_size)
        if self.steps == 0:
            raise ValueError(f"{num_items} items cannot fill one global batch of {world_size} ranks x "
                             f"{batch_size}: lower the batch size or use more data")
        self.start_step = start_step
        self.permutation = FeistelPermutation(num_items, streams.hash_keys(seed, streams.salt("epoch_permutation"), epoch).item()) \
            if shuffle else None

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps):
            lo = step * global_batch + self.rank * self.batch_size
            positions = np.arange(lo, lo + self.batch_size, dtype=np.int64)
            yield self.permutation(positions) if self.permutation is not None else positions


def default_workers(ranks_here: int) -> int:
    """DataLoader workers per rank when ``ranks_here`` ranks share this machine's CPUs: none below 4 CPUs per
    rank (a worker then takes a core from the training step, and the decode cache is faster), else all
    CPUs per rank but 2 (the training process's own), at most 8."""
    from .decoded import usable_cpus
    cpus = usable_cpus() // max(1, ranks_here)
    return 0 if cpus < 4 else min(8, cpus - 2)


def load_batches(source, index_batches, num_workers: int | None = 0):
    """``(inputs, labels)`` of every index batch (a sequence of int arrays/lists) of ``source``:
    rendered in-process when ``source`` has a vectorised ``batch(indices)`` (synthetic data, decoded
    images), else through a ``DataLoader`` with ``num_workers`` workers (None: :func:`default_workers`
    of ``LOCAL_WORLD_SIZE`` ranks), each ``prefetch``-ing 4 batches, in pinned memory when CUDA is present."""
    if hasattr(source, "batch"):
        return (source.batch(np.asarray(idx, dtype=np.int64)) for idx in index_batches)
    if num_workers is None:
        num_workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))
    return iter(torch.utils.data.DataLoader(source, batch_sampler=index_batches, num_workers=num_workers,
                                            prefetch_factor=4 if num_workers else None,
                                            pin_memory=torch.cuda.is_available()))


class SamplerBatches:
    """Consecutive ``batch_size`` batches of one epoch of a per-rank ``sampler`` of indices (the
    incomplete last batch dropped; samplers of :mod:`ffc_parallel.data.samplers` give every rank
    the same length, so every rank runs the same number of steps). ``start_step`` skips batches."""

    def __init__(self, sampler, batch_size: int, epoch: int, start_step: int = 0):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.sampler, self.batch_size, self.start_step = sampler, int(batch_size), int(start_step)
        self.steps = len(sampler) // self.batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self):
        indices = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for step in range(self.start_step, self.steps):
            yield indices[step * self.batch_size: (step + 1) * self.batch_size].numpy()


class RankLoader:
    """``(inputs, labels)`` training batches of ``source`` for one rank and one epoch; ``len()`` = steps.

    Batches come from a shuffled epoch (:class:`EpochBatches`), or from ``sampler`` (a per-rank
    index sampler such as :class:`~ffc_parallel.data.ClassProbabilitySampler`, reseeded with
    ``set_epoch(epoch)``). Sources with a vectorised ``batch(indices)`` (the synthetic data) are
    rendered in-process; other map-style data sets go through a ``DataLoader`` with ``num_workers``.
    """

    def __init__(self, source, batch_size: int, rank: int, world_size: int, *, seed: int = 0, epoch: int = 0,
                 start_step: int = 0, num_workers: int | None = 0, sampler=None):
        self.source, self.num_workers = source, num_workers
        if sampler is not None:
            self.batches = SamplerBatches(sampler, batch_size, epoch, start_step)
        else:
            self.batches = EpochBatches(len(source), batch_size, rank, world_size, seed=seed, epoch=epoch,
                                        start_step=start_step)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return load_batches(self.source, self.batches, self.num_workers)
