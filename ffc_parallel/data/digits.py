"""scikit-learn's built-in ``digits`` (1,797 greyscale 8x8 images of 10 digits): a small real data set
that ships with scikit-learn, so it needs no download."""
from __future__ import annotations

import numpy as np
import torch


class TensorData(torch.utils.data.Dataset):
    """Inputs ``x[n, ...]`` with labels ``y[n]`` held in memory; ``batch(indices)`` indexes both at once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images[1797, 1, 8, 8] in [-1, 1], labels[1797])`` from ``sklearn.datasets.load_digits``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(bunch.target.astype(np.int64))
