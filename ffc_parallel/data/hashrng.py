"""Counter-based random numbers: the value for a key is a pure function of ``(seed, key)``.

Vectorised over NumPy arrays of keys, so a batch of items can be generated in one call while each item
stays reproducible on its own, whatever rank, batch or order asks for it (nothing is stored).
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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
