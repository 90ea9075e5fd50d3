"""FFC's dual loader: every step combines an identity batch and an instance batch.

* identity part: ``id_batch_size`` identities drawn uniformly (shuffled passes over all identities,
  one after the other, continuing across epochs), ``images_per_id`` distinct images of each (all of
  them when the identity has fewer), so few-shot identities are trained as often as rich ones;
* instance part: ``instance_batch_size`` images drawn uniformly (a shuffled pass over all images).

Distributed: both permutations are drawn from ``(seed, epoch)`` identically on every rank and split
round-robin, so ranks see disjoint identities (within a pass) and disjoint instance images; call
:meth:`DualBatchSampler.set_epoch` every epoch. An epoch is one pass of the instance stream
(``len = num_images // (world * instance_batch_size)`` steps, the same on every rank).

Memory is ``O(num_images)`` (labels sorted once into per-identity runs); identity labels may be any
integers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..distributed import streams
from ..distributed.checks import agree_on_sampler
from ..distributed.init import get_rank, get_world_size


def labels_of(dataset) -> torch.Tensor:
    """Per-item labels ``[N]`` of a data set: its ``labels``, ``targets``, ``identities`` or ``y``
    attribute, or ``dataset.labels_of(range(len(dataset)))`` (the built-in data sets)."""
    for name in ("labels", "targets", "identities", "y"):
        value = getattr(dataset, name, None)
        if value is not None and not callable(value):
            return torch.as_tensor(value, dtype=torch.long)
    if callable(getattr(dataset, "labels_of", None)):
        return torch.as_tensor(dataset.labels_of(np.arange(len(dataset))), dtype=torch.long)
    raise ValueError(f"{type(dataset).__name__} exposes no per-item labels: give it a `labels` (or `targets`) "
                     f"attribute, or pass labels=[label of item i for i in range(len(dataset))]")


class DualBatchSampler(Sampler):
    """Batch sampler yielding lists of data-set indices: identity part first, then instance part.

    Args:
        labels: ``[N]`` identity label of every item.
        id_batch_size: identities per step per rank (each brings up to ``images_per_id`` images).
        instance_batch_size: uniformly drawn images per step per rank.
        rank, world_size: default to torch.distributed's.
    """

    def __init__(self, labels, id_batch_size: int, instance_batch_size: int, *, images_per_id: int = 2,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        if id_batch_size < 0 or instance_batch_size < 0 or id_batch_size + instance_batch_size == 0:
            raise ValueError("id_batch_size and instance_batch_size must be >= 0 and not both 0")
        if images_per_id < 1:
            raise ValueError(f"images_per_id must be >= 1, got {images_per_id}")
        self.id_batch_size, self.instance_batch_size = int(id_batch_size), int(instance_batch_size)
        self.images_per_id, self.seed, self.epoch = int(images_per_id), int(seed), 0
        self.num_images = labels.numel()
        self.order = torch.argsort(labels, stable=True)                  # images grouped by identity
        self.identities, counts = torch.unique_consecutive(labels[self.order], return_counts=True)
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        if self.instance_batch_size:
            steps = self.num_images // (self.world_size * self.instance_batch_size)
        else:
            steps = self.identities.numel() // (self.world_size * self.id_batch_size)
        if steps == 0:
            raise ValueError(f"{self.num_images} images / {self.identities.numel()} identities are too few for one "
                             f"step of {self.world_size} ranks x (instance {self.instance_batch_size}, identity "
                             f"{self.id_batch_size}); lower the batch sizes")
        if self.id_batch_size and self.identities.numel() < self.world_size * self.id_batch_size:
            raise ValueError(f"{self.identities.numel()} identities cannot fill {self.world_size} ranks x "
                             f"{self.id_batch_size} distinct identities per step; lower id_batch_size")
        self.steps = steps
        agree_on_sampler("DualBatchSampler", {"images": self.num_images, "label_sum": int(labels.sum()),
                                              "id_batch_size": self.id_batch_size,
                                              "instance_batch_size": self.instance_batch_size,
                                              "images_per_id": self.images_per_id, "seed": self.seed},
                         self.rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def _generator(self) -> torch.Generator:
        return streams.generator(self.seed, "dual_loader", self.epoch)

    def _identity_stream(self):
        """This rank's identity positions, ``id_batch_size`` at a time. Passes over the identities
        continue across epochs (pass p is permuted by ``(seed, p)``), so every identity is drawn
        equally often in the long run, and epoch e resumes exactly where epoch e - 1 stopped."""
        per_pass = self.identities.numel() // self.world_size      # equal share per rank and pass
        steps_per_pass = per_pass // self.id_batch_size
        p, step = divmod(self.epoch * self.steps, steps_per_pass)
        while True:
            g = streams.generator(self.seed, "dual_identities", p)
            mine = torch.randperm(self.identities.numel(), generator=g)[self.rank::self.world_size][:per_pass]
            for lo in range(step * self.id_batch_size, steps_per_pass * self.id_batch_size, self.id_batch_size):
                yield mine[lo: lo + self.id_batch_size]
            p, step = p + 1, 0

    def _images_of(self, positions: torch.Tensor, generator) -> torch.Tensor:
        """Up to ``images_per_id`` distinct images of each identity: a random permutation of each
        identity's images (random keys sorted within its run), first ``images_per_id`` kept."""
        counts, offsets = self.counts[positions], self.offsets[positions]
        starts = torch.cumsum(counts, 0) - counts
        run = torch.repeat_interleave(torch.arange(positions.numel()), counts)
        keys = torch.rand(run.numel(), generator=generator, dtype=torch.float64)
        shuffled = torch.argsort(run.double() + keys) - starts[run]
        keep = torch.arange(run.numel()) - starts[run] < self.images_per_id
        return self.order[offsets[run[keep]] + shuffled[keep]]

    def parts(self):
        """This epoch's steps as ``(identity_part, instance_part)`` index tensors."""
        generator = self._generator()
        images = torch.randperm(self.num_images, generator=generator)[self.rank::self.world_size]
        ids = self._identity_stream() if self.id_batch_size else None
        for step in range(self.steps):
            identity_part = self._images_of(next(ids), generator) if ids is not None else images[:0]
            lo = step * self.instance_batch_size
            yield identity_part, images[lo: lo + self.instance_batch_size]

    def __iter__(self):
        for identity_part, instance_part in self.parts():
            yield torch.cat([identity_part, instance_part]).tolist()


def dual_loader(dataset, id_batch_size: int, instance_batch_size: int, *, labels=None, images_per_id: int = 2,
                seed: int = 0, rank: int | None = None, world_size: int | None = None, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` driven by :class:`DualBatchSampler` (labels from
    :func:`labels_of` unless given). Call ``loader.batch_sampler.set_epoch(epoch)`` every epoch."""
    sampler = DualBatchSampler(labels_of(dataset) if labels is None else labels, id_batch_size,
                               instance_batch_size, images_per_id=images_per_id, seed=seed, rank=rank,
                               world_size=world_size)
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
