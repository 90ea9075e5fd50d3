"""Decode an image data set once into a uint8 memory-mapped array, so every later epoch (and run) reads raw pixels.

``ffc-train --decode-cache DIR`` (default ``auto``: under ``--output-dir`` when the array is at most
4 GiB). The array ``DIR/<key>.npy`` (``[N, C, H, W]`` uint8, a NumPy ``.npy`` file) is keyed by the
files (paths, sizes, modification times), the image size and the channels: a changed data set gets a new
array. The first process to take ``<key>.lock`` decodes with one worker per CPU and renames the finished
file into place; the other ranks wait on the lock and then map the same file.
"""
from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fingerprint(source) -> str:
    """A key of an ImageFolder's or RecordIOFaces' files and decoding options (hex)."""
    h = hashlib.sha1(f"{type(source).__name__}|{source.image_size}|{source.channels}|{len(source)}".encode())
    files = getattr(source, "paths", None) or [source.reader.rec_path]
    for path in files:
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images in ``[-1, 1]`` (``decode_image``'s ``pixel / 127.5 - 1``) -> their uint8 pixels."""
    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def to_float(pixels) -> torch.Tensor:
    """uint8 pixels ``[..., C, H, W]`` -> float32 in ``[-1, 1]``, the values ``decode_image`` gives."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0)


_WORK = {}


def _decode_rows(args) -> None:
    lo, hi = args
    source, path = _WORK["source"], _WORK["path"]
    out = np.load(path, mmap_mode="r+")
    out[lo:hi] = to_uint8(torch.stack([source[i][0] for i in range(lo, hi)]))
    out.flush()


def _build(source, path: Path, shape, workers: int) -> None:
    tmp = path.with_name(path.name + ".partial")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
    chunks = [(lo, min(lo + 512, shape[0])) for lo in range(0, shape[0], 512)]
    _WORK.update(source=source, path=tmp)
    try:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(_decode_rows, chunks):
                    pass
        else:
            for chunk in chunks:
                _decode_rows(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _WORK.clear()
    os.replace(tmp, path)


class DecodedImages(torch.utils.data.Dataset):
    """``source`` (an ImageFolder or RecordIOFaces) decoded once into ``cache_dir``: ``dataset[i] = (image[C, H,
    W] float in [-1, 1], label)``, ``batch(indices) -> (images[b, C, H, W], labels[b])`` read from the mapped
    uint8 array; ``labels``, ``bad_images`` and the other attributes of ``source`` are kept."""

    def __init__(self, source, cache_dir, workers: int | None = None):
        self.labels, self.bad_images = source.labels, source.bad_images
        self.classes = getattr(source, "classes", None)   # ImageFolder: the class folder names
        self.image_size, self.channels = source.image_size, source.channels
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / f"{fingerprint(source)}.npy"
        shape = (len(source), source.channels, source.image_size, source.image_size)
        with open(cache_dir / f"{self.path.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one process decodes; the others wait here, then map its file
            if not self.path.exists():
                _build(source, self.path, shape, workers or usable_cpus())
        self._pixels = None
        if self.pixels.shape != shape:
            raise ValueError(f"decode cache {self.path} holds images {self.pixels.shape}, expected {shape}: "
                             "delete it (or choose another --decode-cache directory)")

    @property
    def pixels(self) -> np.ndarray:
        """The mapped ``[N, C, H, W]`` uint8 array (opened once per process)."""
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        return self._pixels

    def __getstate__(self):   # DataLoader workers map the file themselves
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return to_float(self.pixels[int(i)]), int(self.labels[i])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")   # ascending reads of the mapped file
        pixels = np.empty((len(idx), *self.pixels.shape[1:]), dtype=np.uint8)
        pixels[order] = self.pixels[idx[order]]
        return to_float(pixels), torch.from_numpy(np.asarray(self.labels)[idx])
