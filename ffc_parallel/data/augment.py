"""Training-time augmentation of image files: a random horizontal flip (insightface's
``RandomHorizontalFlip``), drawn from ``(seed, epoch, item)`` so that a run is reproducible and a resumed
epoch sees the same flips."""
from __future__ import annotations

import numpy as np
import torch

from ..distributed import streams


class RandomFlip(torch.utils.data.Dataset):
    """``source[i] = (image[C, H, W], label)`` mirrored left-right with probability ``p``, decided by
    :func:`~ffc_parallel.distributed.streams.uniform` of ``(seed, "train_flip", epoch, i)``; set
    :attr:`epoch` before each epoch (DataLoader workers take a copy when they start)."""

    def __init__(self, source, seed: int, p: float = 0.5):
        self.source, self.seed, self.p, self.epoch = source, int(seed), float(p), 0

    def __len__(self) -> int:
        return len(self.source)

    def flipped(self, indices) -> np.ndarray:
        """Whether each of ``indices`` is mirrored in the current epoch (bool array)."""
        return streams.uniform(self.seed, streams.salt("train_flip"), self.epoch, np.asarray(indices)) < self.p

    def __getitem__(self, i: int):
        image, label = self.source[i]
        return (image.flip(-1) if self.flipped(int(i)) else image), label


class BatchFlip(RandomFlip):
    """:class:`RandomFlip` of a source with a vectorised ``batch(indices)`` (decoded images): ``batch`` too."""

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.batch(indices)
        flip = torch.from_numpy(self.flipped(indices))
        x[flip] = x[flip].flip(-1)
        return x, y


def random_flip(source, seed: int) -> RandomFlip:
    """A :class:`BatchFlip` when ``source`` has ``batch(indices)``, else a :class:`RandomFlip`."""
    return (BatchFlip if hasattr(source, "batch") else RandomFlip)(source, seed)
