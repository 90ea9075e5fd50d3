"""How a chunked loss walks the classes of a shard: the memory plan, the compute tiles, where the
targets fall, and the cosines of a chunk. Shared by every chunked loss on the head's centers (the
fused softmax, the sigmoid focal loss) and by top-k prediction.

A call covers ``num_cols`` used classes (all local rows, or the rows Partial FC sampled) in tiles of
at most ``chunk`` classes. The :class:`ChunkPlan` splits the memory budget between work buffers and
logits kept from the forward for the backward; :meth:`ChunkPlan.tile` caps the tile on CPU so that a
``[B, tile]`` buffer stays in the last-level cache. The planner (``ffc_parallel/planner.py``) models
memory from these same functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_MEMORY_BUDGET_MB = 256
_WORK_BUFFERS = 3  # [B, chunk] buffers the budget sets aside for work (see ChunkPlan.cache_bytes)
CPU_TILE_BYTES = 4 << 20  # largest [B, tile] stats buffer on CPU (4-8 MiB measured faster than 22 MiB)


@dataclass(frozen=True)
class ChunkPlan:
    """How the memory budget is split: work buffers of ``chunk`` classes, and ``cached`` chunks' worth
    of exponentiated logits kept between forward and backward. The loss computes in tiles of at most
    ``chunk`` classes (:meth:`tile`) and caches by bytes (:meth:`cache_bytes`)."""

    chunk: int
    cached: int

    @staticmethod
    def for_budget(batch: int, num_cols: int, elem_bytes: int, budget_bytes: int,
                   chunk_size: int | None = None) -> "ChunkPlan":
        """Largest chunk whose work buffers use at most a quarter of ``budget_bytes``; the rest of
        the budget caches chunks for the backward. ``chunk_size`` overrides the chunk."""
        row_bytes = max(batch, 1) * elem_bytes
        if chunk_size is None:
            chunk_size = max(1, budget_bytes // (4 * _WORK_BUFFERS * row_bytes))
        chunk = max(1, min(int(chunk_size), max(num_cols, 1)))
        spare = budget_bytes - _WORK_BUFFERS * row_bytes * chunk
        cached = max(0, spare // (row_bytes * chunk)) if spare > 0 else 0
        return ChunkPlan(chunk, int(min(cached, math.ceil(num_cols / chunk))))

    def tile(self, batch: int, stats_bytes: int, device_type: str) -> int:
        """Classes per compute tile: ``chunk``, capped on CPU so that a ``[batch, tile]`` stats buffer
        takes at most ``CPU_TILE_BYTES`` and the elementwise passes after its GEMM run in cache."""
        if device_type != "cpu":
            return self.chunk
        return max(1, min(self.chunk, CPU_TILE_BYTES // (max(batch, 1) * stats_bytes)))

    def cache_bytes(self, batch: int, num_cols: int, dim: int, weight_bytes: int, stats_bytes: int,
                    tile: int, direct: bool) -> int:
        """Bytes of ``exp2(logit - row max)`` the forward may keep for the backward in tensors of its
        own: the ``cached`` chunks, less whatever the loss's buffers (:func:`work_bytes`) take beyond
        the ``_WORK_BUFFERS`` chunks the budget set aside (the center-gradient buffer the CPU cache
        may borrow comes on top, see ``borrowed_grad.py``)."""
        row = max(batch, 1) * stats_bytes
        spare = _WORK_BUFFERS * row * self.chunk - work_bytes(batch, num_cols, dim, weight_bytes, stats_bytes,
                                                               tile, direct)
        return max(0, min(self.cached * row * self.chunk + min(0, spare), row * num_cols))


def work_bytes(batch: int, num_cols: int, dim: int, weight_bytes: int, stats_bytes: int, tile: int,
               direct: bool) -> int:
    """Buffers of one call besides the cache: a ``[batch, tile]`` stats buffer (and the half-precision
    GEMM output copied into it), two or three ``[tile, D]`` (scaled rows, a product, the center
    gradient of a tile unless it is written in place) and ``sigma / |w|`` of every class used."""
    tile = min(tile, max(num_cols, 1))
    logits = batch * tile * (stats_bytes + (weight_bytes if weight_bytes < stats_bytes else 0))
    return logits + (2 + (not direct)) * tile * dim * weight_bytes + num_cols * stats_bytes


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp statistics and elementwise softmax work (fp32 at least)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tiles(n: int, width: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering columns ``0:n`` in order, ``width`` at a time."""
    return [(i, min(i + width, n)) for i in range(0, n, width)]


class TileTargets:
    """The entries of a ``[n, T]`` target-column table (-1: not a column here) sorted by column, cut
    at the tile edges: ``tile(i, start)`` gives ``(rows, cols - start, t)`` of the entries inside
    tile ``i`` (which starts at column ``start``), or None (most tiles of a large shard hold no
    target)."""

    def __init__(self, cols: torch.Tensor, edges: list[int]):
        rows, t = (cols >= 0).nonzero(as_tuple=True)
        c = cols[rows, t]
        order = torch.argsort(c, stable=True)
        self.rows, self.cols, self.t = rows[order], c[order], t[order]
        self.bounds = torch.searchsorted(self.cols, torch.tensor(edges, device=cols.device)).tolist()

    def tile(self, i: int, start: int):
        lo, hi = self.bounds[i], self.bounds[i + 1]
        return None if lo == hi else (self.rows[lo:hi], self.cols[lo:hi] - start, self.t[lo:hi])


def chunk_rows(weight, rows, start, stop, sdt):
    """Local classes ``start:stop`` (of ``rows`` if given): ``(w_c[n, D], inv_norm[n] in sdt)``.

    ``w_c`` is a view of ``weight`` when ``rows`` is None and a copy of the ``n`` selected rows
    otherwise (never a copy of the whole shard).
    """
    w_c = weight[start:stop] if rows is None else weight.index_select(0, rows[start:stop])
    inv = torch.linalg.vector_norm(w_c, dim=1, dtype=sdt).clamp_min_(1e-12).reciprocal_()
    return w_c, inv


def chunk_cosines(xn, w_c, inv):
    """Cosines ``[B, n]`` (stats dtype, clamped to [-1, 1]) of ``xn[B, D]`` against ``w_c``."""
    cos = torch.mm(xn, w_c.t())
    cos = cos.to(inv.dtype) if cos.dtype != inv.dtype else cos
    return cos.mul_(inv).clamp_(-1.0, 1.0)
