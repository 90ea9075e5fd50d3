"""Images in ImageFolder layout: ``root/<class name>/<image file>``, classes numbered in sorted name order."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def decode_image(data, size: int, channels: int = 3) -> torch.Tensor:
    """A file path or encoded bytes -> float tensor ``[channels, size, size]`` in ``[-1, 1]``
    (1 channel: greyscale; 3: RGB), resized with bilinear filtering."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading images needs Pillow: pip install pillow") from exc
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<file>`` images: ``dataset[i] = (image[channels, size, size], label)``.

    ``labels`` ``[n]`` and ``classes`` (sorted directory names) are read from the directory listing
    alone; images are decoded on access.
    """

    def __init__(self, root, image_size: int = 32, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}/<class>/")
        self.paths, self.labels = paths, np.asarray(labels, dtype=np.int64)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return decode_image(self.paths[i], self.image_size, self.channels), int(self.labels[i])
