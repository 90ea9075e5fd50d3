"""Images in ImageFolder layout: ``root/<class name>/<image file>``, classes numbered in sorted name order."""
from __future__ import annotations

import io
import multiprocessing
import sys
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


BAD_IMAGE_CHOICES = ("fail", "skip")


class UnreadableImage(OSError):
    """An image that does not decode; the message names its file (or record)."""


class BadImages:
    """What a data set does with an image that does not decode (``on_bad_image``).

    ``"fail"``: raise :class:`UnreadableImage` naming it. ``"skip"``: decode the next image of the same
    class instead (cyclically, in item order) and count the replacement in :attr:`skipped`, a counter
    shared with DataLoader workers. Replacing rather than dropping keeps every batch at its size and
    every label and class count as planned: the sharded head's collectives, DeepSpeed's fixed
    micro-batch, the samplers and the class-frequency buckets all rely on them.
    """

    def __init__(self, on_bad_image: str, labels: np.ndarray):
        if on_bad_image not in BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_CHOICES)}, got {on_bad_image!r}")
        self.mode, self.labels = on_bad_image, np.asarray(labels)
        self._count = multiprocessing.Value("q", 0) if on_bad_image == "skip" else None

    @property
    def skipped(self) -> int:
        """Images replaced so far by this process and its DataLoader workers."""
        return self._count.value if self._count is not None else 0

    def load(self, i: int, decode, name):
        """``decode(i)`` under the policy; ``name(j)`` names item ``j`` in messages."""
        try:
            return decode(i)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, AttributeError, ...
            error = UnreadableImage(f"unreadable image {name(i)}: {type(exc).__name__}: {exc}")
            if self.mode == "fail":
                raise error from exc
        members = np.nonzero(self.labels == self.labels[i])[0]
        for j in np.roll(members, -int(np.searchsorted(members, i)))[1:]:
            try:
                image = decode(int(j))
            except Exception:
                continue
            with self._count.get_lock():
                self._count.value += 1
            print(f"ffc_parallel: skipped {error} (using {name(int(j))} of the same class)", file=sys.stderr,
                  flush=True)
            return image
        raise UnreadableImage(f"{error}; no other image of its class (label {self.labels[i]}) decodes either")


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<file>`` images: ``dataset[i] = (image[channels, size, size], label)``.

    ``labels`` ``[n]`` and ``classes`` (sorted directory names) are read from the directory listing
    alone; images are decoded on access. ``on_bad_image`` (``"fail"`` or ``"skip"``): see :class:`BadImages`.
    """

    def __init__(self, root, image_size: int = 32, channels: int = 3, on_bad_image: str = "fail"):
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
        self.bad_images = BadImages(on_bad_image, self.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.bad_images.load(i, lambda j: decode_image(self.paths[j], self.image_size, self.channels),
                                     lambda j: str(self.paths[j]))
        return image, int(self.labels[i])
