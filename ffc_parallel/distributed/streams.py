"""Seeded random streams: every random draw of the package is a pure function of ``(seed, stream, keys)``.

A stream is named in :data:`STREAMS` (one line each, so that no two draws share numbers by accident
and none is the stream of ``torch.manual_seed(seed)``); its keys say which part it is (a rank, a step,
an epoch, a block of classes). Because nothing is stored, any rank can redraw any part at any time:
resuming, resharding and a rank that needs another rank's draw all get the same numbers.

* :func:`generator` — a ``torch.Generator`` for ``(seed, stream, *keys)`` (torch's own samplers);
* :func:`numpy_generator` — the same for NumPy;
* :func:`hash_keys`, :func:`uniform`, :func:`normal` — counter-based numbers, vectorised over NumPy
  arrays of keys (the built-in data draws a batch of items at once, each reproducible on its own).
"""
from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Every stream of the package: name -> the salt that keeps it apart from every other.
STREAMS = {
    # counter-based (hash_keys / uniform / normal over arrays of keys)
    "synthetic_count": 1,       # keys: identity (images per identity)
    "synthetic_latent": 2,      # keys: identity
    "synthetic_expression": 3,  # keys: identity, image
    "synthetic_pose": 4,        # keys: identity, image
    "synthetic_light": 5,       # keys: identity, image
    "synthetic_pixel": 6,       # keys: noise pattern, or identity and image
    "synthetic_wrong_label": 7,  # keys: identity, image (label noise)
    "split_classes": 0x5EE,     # keys: class (seen / unseen identities)
    "split_items": 0x4E1D,      # keys: item (gallery / probe)
    "split_limit": 0xCA9,       # keys: position (evaluation subsets)
    "epoch_permutation": 0xE90C,  # keys: epoch (the Feistel shuffle of RankLoader)
    # generators (generator / numpy_generator)
    "center_init": 0xC1,        # keys: block of 2^16 global classes (the init never depends on sharding)
    "partial_fc": 0xC2,         # keys: rank, sample step (negatives drawn by each class shard)
    "mixup": 0xC3,              # keys: step (lambda and layer, the same on every rank)
    "mixup_partners": 0xC4,     # keys: rank, step (partners within the local batch)
    "cam": 0xC5,                # keys: rank, step (which images are CAM-transformed, and how)
    "class_sampler": 0xC6,      # keys: epoch (the global epoch of the re-samplers)
    "dual_loader": 0xC7,        # keys: epoch (instance part and image picks)
    "dual_identities": 0xC8,    # keys: pass over the identities
    "instance_views": 0xC9,     # keys: epoch, first item, batch length
    "cam_set": 0xCA,            # no keys: the stored CAM balancing set (CamBalancer)
    "synthetic_renderer": 0xCB,  # no keys: the built-in data's fixed projections (latent -> pixels)
    "verification_pairs": 0xCC,  # no keys: the pairs drawn by evaluation.verification.pairs_from_folder
    "train_flip": 0xF11,        # counter-based, keys: epoch, item (horizontal flip of a training image)
}


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective avalanche hash of ``uint64`` values."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, *keys) -> np.ndarray:
    """One ``uint64`` hash per broadcast element of ``keys`` (ints or integer arrays), salted by ``seed``."""
    with np.errstate(over="ignore"):
        h = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        for key in keys:
            h = mix64(h ^ (np.asarray(key).astype(np.uint64) * _GOLDEN + np.uint64(1)))
    return h


def uniform(seed: int, *keys, n: int | None = None) -> np.ndarray:
    """Uniform floats in (0, 1): shape ``broadcast(keys)`` or ``broadcast(keys) + (n,)``."""
    h = hash_keys(seed, *keys)
    if n is not None:
        with np.errstate(over="ignore"):
            h = mix64(h[..., None] + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def normal(seed: int, *keys, n: int) -> np.ndarray:
    """Standard normal floats, shape ``broadcast(keys) + (n,)`` (Box-Muller on two uniforms)."""
    u = uniform(seed, *keys, n=2 * n)
    return np.sqrt(-2.0 * np.log(u[..., :n])) * np.cos(2.0 * np.pi * u[..., n:])


def salt(stream: str) -> int:
    """The salt of ``stream``, a name in :data:`STREAMS` (the first key of every draw from it)."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}: add it to ffc_parallel.distributed.streams.STREAMS")
    return STREAMS[stream]


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for part ``keys`` of ``stream`` under ``seed``."""
    return int(hash_keys(int(seed), salt(stream), *(int(k) for k in keys))) & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for part ``keys`` of ``stream``: resumable and reproducible anywhere."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *keys))


def numpy_generator(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A NumPy generator for part ``keys`` of ``stream``."""
    return np.random.default_rng(stream_seed(seed, stream, *keys))
