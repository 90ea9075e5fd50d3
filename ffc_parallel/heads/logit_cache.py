"""The exponentiated logits a forward keeps for its backward.

``exp2(logit - row max)`` of the leading tiles that fit the cache part of the memory budget
(:meth:`~ffc_parallel.heads.chunking.ChunkPlan.cache_bytes`) are kept; the backward then forms their
softmax with one multiply and recomputes the other tiles (one extra GEMM for those tiles only). On
CPU the entries first go into the not yet written center-gradient buffer (``borrowed_grad.py``), the
rest into the head's :class:`CacheArena`, one buffer kept from call to call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .borrowed_grad import BorrowedGradient


@dataclass
class CachedTile:
    """One tile's entry: ``exp[n, k] = 2^(z - row max)``, ``row_max[n, 1]``, the filtered entries
    ``mask[n, k]`` (or None)."""

    exp: torch.Tensor
    row_max: torch.Tensor
    mask: torch.Tensor | None


class CacheArena:
    """One flat buffer a head's CPU logit caches take in turn (``checkout`` / the cache's ``clear``).

    A fresh CPU tensor of a few MiB faults its pages in as it is first written and glibc keeps it after
    it is freed; a step's cache is tens of such tiles (``[B, tile]`` stats), so tiles of their own cost
    page faults or retained memory every step. The arena is allocated once (grown when a call needs
    more) and lent to one cache at a time: a second cache alive at once (two forwards before their
    backwards) gets None and allocates its tiles as before. On an accelerator the caching allocator
    already reuses memory; the head uses an arena only on a CPU.
    """

    def __init__(self):
        self._buffer, self._lent = None, False

    def checkout(self, elements: int, dtype, device) -> torch.Tensor | None:
        """A flat buffer of at least ``elements`` (None when lent out already)."""
        if self._lent:
            return None
        b = self._buffer
        if b is None or b.numel() < elements or b.dtype != dtype or b.device != torch.device(device):
            self._buffer = None   # the old one goes before the new one is made
            self._buffer = b = torch.empty(elements, dtype=dtype, device=device)
        self._lent = True
        return b

    def give_back(self) -> None:
        self._lent = False


class LogitCache:
    """``(piece, tile index) -> CachedTile`` kept from the forward for the backward.

    Entries go into the optional ``borrow`` (:class:`BorrowedGradient`) while it has room, then into
    tensors of their own while ``capacity`` elements last. The backward takes each entry once: a
    second backward through the same graph finds none and recomputes.
    """

    def __init__(self, capacity: int, dtype, device, borrow: BorrowedGradient | None = None,
                 arena: CacheArena | None = None):
        self.left, self.dtype, self.device, self.borrow = capacity, dtype, device, borrow
        self.entries = {}
        self._flat = arena.checkout(capacity, dtype, device) if arena is not None and capacity > 0 else None
        self._used = 0
        # the arena is lent back at clear(), or when a graph that never ran its backward drops this cache
        self._give_back = weakref.finalize(self, arena.give_back) if self._flat is not None else None

    @classmethod
    def for_call(cls, walk, weight: torch.Tensor, record: bool, wants_weight_grad: bool) -> "LogitCache":
        """The cache of one forward over ``walk`` (a :class:`~ffc_parallel.heads.walk.TileWalk`):
        the plan's cache bytes (in the options' ``cache_arena`` on a CPU), and the borrowed gradient
        buffer where that is allowed; nothing without a recorded graph (``record``)."""
        if not record:
            return cls(0, walk.sdt, weight.device)
        sbytes = torch.finfo(walk.sdt).bits // 8
        capacity = walk.options.plan.cache_bytes(walk.batch, walk.num_cols, weight.shape[1], weight.element_size(),
                                                 sbytes, walk.width, walk.direct) // sbytes
        borrow = BorrowedGradient.for_call(weight, walk.direct, walk.sdt, walk.options.grad_buffer) \
            if wants_weight_grad else None
        arena = walk.options.cache_arena if weight.device.type == "cpu" else None
        return cls(capacity, walk.sdt, weight.device, borrow, arena)

    def slot(self, rows: int, start: int, stop: int) -> torch.Tensor | None:
        """A ``[rows, stop - start]`` tensor for the entry of tile ``start:stop``, or None when full."""
        kept = self.borrow.place(rows, start, stop) if self.borrow is not None else None
        if kept is not None:
            return kept
        size = rows * (stop - start)
        if 0 < size <= self.left:
            self.left -= size
            if self._flat is not None:
                self._used += size
                return self._flat[self._used - size: self._used].view(rows, stop - start)
            return torch.empty((rows, stop - start), dtype=self.dtype, device=self.device)
        return None

    def keep(self, piece: int, index: int, exp, row_max, mask) -> None:
        self.entries[piece, index] = CachedTile(exp, row_max, mask)

    def take(self, piece: int, index: int) -> CachedTile | None:
        """The entry of tile ``index`` of piece ``piece``, removed from the cache (None: recompute)."""
        return self.entries.pop((piece, index), None)

    def clear(self) -> None:
        """Drop what a backward left (no view of the gradient buffer or the arena may outlive it)."""
        self.entries.clear()
        if self._give_back is not None:
            self._give_back()   # once: the finalizer is spent
