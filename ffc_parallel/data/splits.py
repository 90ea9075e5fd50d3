"""Split a labelled data set into training items, held-out items of training classes, and unseen classes.

Real data sets (ImageFolder, RecordIO, digits) come as one list of labelled items; evaluation needs
images of training identities that were never trained on (top-1 through the head) and identities never
seen at all (verification, retrieval). The split is deterministic by seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import streams


@dataclass
class IdentitySplit:
    """Item indices into the base data set and their labels after the split.

    ``train_labels`` / ``seen_labels`` are remapped to ``0..num_classes-1`` (training classes in
    ascending original order); ``unseen_ids`` number the unseen classes ``0..U-1``.
    """

    train: np.ndarray
    train_labels: np.ndarray
    seen: np.ndarray
    seen_labels: np.ndarray
    unseen: np.ndarray
    unseen_ids: np.ndarray
    num_classes: int
    original_classes: np.ndarray  # [num_classes]: the original label of each training class

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels, minlength=self.num_classes)


def split_identities(labels, *, unseen_fraction: float = 0.1, heldout_per_class: int = 1,
                     min_train_per_class: int = 1, seed: int = 0) -> IdentitySplit:
    """Split items with original ``labels[n]`` (ints) by class.

    A ``unseen_fraction`` of the classes (drawn by seed) is kept out of training entirely. Every other
    class keeps at least ``min_train_per_class`` items for training and gives up to
    ``heldout_per_class`` of the rest (drawn by seed) as held-out images of a seen class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to split, got {len(classes)}")
    order = np.argsort(streams.uniform(seed, streams.salt("split_classes"), classes))
    num_unseen = int(round(unseen_fraction * len(classes)))
    if num_unseen >= len(classes):
        raise ValueError(f"unseen_fraction={unseen_fraction} leaves no training class")
    unseen_classes = np.sort(classes[order[:num_unseen]])
    train_classes = np.sort(classes[order[num_unseen:]])

    is_unseen = np.isin(labels, unseen_classes)
    unseen = np.nonzero(is_unseen)[0]
    unseen_ids = np.searchsorted(unseen_classes, labels[unseen])

    items = np.nonzero(~is_unseen)[0]
    # Rank of each item inside its class, in a seeded random order.
    key = streams.uniform(seed, streams.salt("split_items"), items)
    items = items[np.lexsort((key, labels[items]))]
    cls = labels[items]
    first = np.searchsorted(cls, cls, side="left")
    rank_in_class = np.arange(len(items)) - first
    class_index = np.searchsorted(train_classes, cls)
    size = np.bincount(class_index)[class_index]
    held_count = np.clip(size - min_train_per_class, 0, heldout_per_class)
    held = rank_in_class < held_count
    train, seen = np.sort(items[~held]), np.sort(items[held])
    return IdentitySplit(train=train, train_labels=np.searchsorted(train_classes, labels[train]),
                         seen=seen, seen_labels=np.searchsorted(train_classes, labels[seen]),
                         unseen=unseen, unseen_ids=unseen_ids, num_classes=len(train_classes),
                         original_classes=train_classes)


class Subset(torch.utils.data.Dataset):
    """Items ``indices`` of ``base`` (which returns ``(input, label)``) with new ``labels``."""

    def __init__(self, base, indices: np.ndarray, labels: np.ndarray):
        self.base, self.indices, self.labels = base, np.asarray(indices), np.asarray(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])][0], int(self.labels[i])


class BatchSubset(Subset):
    """A :class:`Subset` of a base with a vectorised ``batch(indices)`` (decoded images): ``batch`` too."""

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.base.batch(self.indices[idx])[0], torch.from_numpy(self.labels[idx])


def subset(base, indices: np.ndarray, labels: np.ndarray) -> Subset:
    """A :class:`BatchSubset` when ``base`` has ``batch(indices)``, else a :class:`Subset`."""
    return (BatchSubset if hasattr(base, "batch") else Subset)(base, indices, labels)


def stack_inputs(base, indices) -> torch.Tensor:
    """The inputs of items ``indices`` of ``base`` stacked into one tensor ``[n, ...]``."""
    if hasattr(base, "batch") and len(indices):
        return base.batch(np.asarray(indices, dtype=np.int64))[0]
    return torch.stack([torch.as_tensor(base[int(i)][0]) for i in indices]) if len(indices) else torch.empty(0)


def cap_positions(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Positions into ``indices`` of at most ``limit`` of them (a seeded sample, in order), or of all."""
    if limit is None or len(indices) <= limit:
        return np.arange(len(indices))
    return np.sort(np.argsort(streams.uniform(seed, streams.salt("split_limit"), np.arange(len(indices))))[:limit])
