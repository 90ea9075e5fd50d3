"""CPU only: the logit cache borrows the center gradient's buffer until the backward writes it.

On CPU the pages of a fresh ``torch.empty`` buffer are committed as they are first written, so cache
entries kept in the not yet written center gradient ``[num_cols, D]`` cost no memory beyond the
gradient (about half the logits fit there at B 256, D 128). The backward writes that gradient tile
by tile, in order, so tile ``j``'s entry is placed at or after the gradient rows of the tiles before
it and after the previous entry: every entry is read before its memory is overwritten. A tile whose
entry overlaps its own gradient rows writes them through a temporary.

The general path sees this piece through :class:`BorrowedGradient` alone: the logit cache asks
:meth:`~BorrowedGradient.place` for room, the center-gradient writer takes the buffer with
:meth:`~BorrowedGradient.hand_over` and asks :meth:`~BorrowedGradient.overlaps`. The planner models
memory with the policy functions :func:`borrows_gradient` and :func:`borrowed_columns`.
"""
from __future__ import annotations

import torch

from .chunking import tiles


def borrows_gradient(device_type: str, direct: bool, grad_exists: bool, stats_dtype_grad: bool) -> bool:
    """Whether the cache may live in the center gradient's buffer until the backward writes it: on
    CPU (the buffer's pages are committed as they are first written, so the borrowed part costs no
    memory beyond the gradient), one piece over all classes (the backward writes the gradient tile
    by tile, in order, into a buffer it returns), no gradient kept from an earlier step, and the
    gradient in the stats dtype (``stats_dtype_grad``)."""
    return device_type == "cpu" and direct and not grad_exists and stats_dtype_grad


def _offset(end: int, start: int, size: int, dim: int, total: int) -> int | None:
    """Element offset of the entry (``size`` elements) of the tile starting at column ``start``: past
    the previous entry (which ends at ``end``) and past the gradient rows before the tile; None when
    it does not fit the ``total`` elements of the buffer."""
    offset = max(end, start * dim)
    return offset if offset + size <= total else None


def borrowed_columns(batch: int, num_cols: int, dim: int, tile: int) -> int:
    """Classes whose cache entries fit the ``[num_cols, dim]`` gradient buffer: tile j is placed at or
    after the gradient rows of tiles before it (written by the backward before it reaches tile j)
    and after the previous entry; placement stops at the first tile that does not fit."""
    end = 0
    for start, stop in tiles(num_cols, tile):
        size = batch * (stop - start)
        offset = _offset(end, start, size, dim, num_cols * dim)
        if offset is None:
            return start
        end = offset + size
    return num_cols


def gradient_buffer(weight, zero: bool, spare=None) -> torch.Tensor:
    """A contiguous buffer shaped like ``weight`` (zeroed when ``zero``): a view of ``spare`` when that has
    room (same dtype and device), else a new one."""
    if spare is not None and spare.dtype == weight.dtype and spare.device == weight.device \
            and spare.is_contiguous() and spare.numel() >= weight.numel():
        grad = spare.view(-1)[: weight.numel()].view(weight.shape)
        return grad.zero_() if zero else grad
    return torch.zeros_like(weight, memory_format=torch.contiguous_format) if zero \
        else torch.empty_like(weight, memory_format=torch.contiguous_format)


class BorrowedGradient:
    """The center gradient's buffer ``[num_cols, D]`` (new, or a released one: not yet written), lent
    to the logit cache from the forward until the backward makes it the gradient."""

    def __init__(self, weight: torch.Tensor, spare: torch.Tensor | None = None):
        self._buffer = gradient_buffer(weight, False, spare)
        self._flat, self._dim, self._end, self._offsets = self._buffer.view(-1), weight.shape[1], 0, {}

    @classmethod
    def for_call(cls, weight: torch.Tensor, direct: bool, sdt: torch.dtype,
                 spare: torch.Tensor | None = None) -> "BorrowedGradient | None":
        """The buffer to lend in a forward that caches for ``weight``'s gradient, where
        :func:`borrows_gradient` allows it (``direct``: one piece over all classes), else None; a view of
        ``spare`` (a released gradient) when that has room."""
        if borrows_gradient(weight.device.type, direct, weight.grad is not None, weight.dtype == sdt):
            return cls(weight, spare)
        return None

    def place(self, rows: int, start: int, stop: int) -> torch.Tensor | None:
        """A ``[rows, stop - start]`` view for the entry of tile ``start:stop`` (tiles in order), or
        None once a tile does not fit (the later ones do not either)."""
        if self._flat is None:
            return None
        size = rows * (stop - start)
        offset = _offset(self._end, start, size, self._dim, self._flat.numel())
        if offset is None:
            self._flat = None
            return None
        self._end, self._offsets[start] = offset + size, offset
        return self._flat[offset: offset + size].view(rows, stop - start)

    def overlaps(self, start: int, stop: int) -> bool:
        """Whether the entry of tile ``start:stop`` lies in the tile's own gradient rows."""
        offset = self._offsets.get(start)
        return offset is not None and offset < stop * self._dim

    def hand_over(self) -> torch.Tensor | None:
        """The buffer, once (None afterwards), keeping no reference to it: autograd copies a gradient
        that something else still references."""
        buffer, self._buffer, self._flat = self._buffer, None, None
        return buffer
