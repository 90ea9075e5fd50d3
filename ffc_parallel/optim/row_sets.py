"""A step's sets of class rows (sorted unique int64 ids ``[R]``, CPU), handled a piece at a time.

A step of a stored head at ``R`` = 5e5 rows moves several such sets around (its rows, the next step's
candidates, their positions in each other). Whole-set tensor expressions make ``[R]`` int64 temporaries
(4 MB each, some 30 a step), and glibc keeps their freed blocks in its heap, where they inflate the
process's resident memory well beyond what is live. Here every temporary is of one :data:`PIECE` of ids
at most; what a caller needs whole (positions to gather by) is written into the caller's tensor.
"""
from __future__ import annotations

import torch

PIECE = 1 << 16   # ids per piece: a piece's int64 temporaries are 512 KiB
ROWS_PIECE_BYTES = 1 << 20   # bytes of the row values a piece gathers at most


def rows_piece(row_bytes: int) -> int:
    """Ids per piece when each gathers rows of ``row_bytes``: :data:`ROWS_PIECE_BYTES` of them at most."""
    return max(1, min(PIECE, ROWS_PIECE_BYTES // max(1, row_bytes)))


def sort_(ids: torch.Tensor) -> torch.Tensor:
    """Sort CPU int64 ``ids`` in place and return them (numpy sorts in place; ``torch.sort`` would
    allocate the values and ``[n]`` int64 indices)."""
    ids.numpy().sort()
    return ids


def sorted_copy(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` sorted, as one new tensor."""
    return sort_(ids.clone())


def isin_small(ids: torch.Tensor, few: torch.Tensor) -> torch.Tensor:
    """Positions ``i`` (ascending) with ``ids[i]`` in ``few`` (a small set)."""
    found = [torch.isin(ids[a:a + PIECE], few).nonzero().flatten().add_(a) for a in range(0, ids.numel(), PIECE)]
    return torch.cat(found) if found else torch.empty(0, dtype=torch.long)


def runs(rows: torch.Tensor, boundary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(firsts, lengths)`` of the maximal runs of consecutive ids of sorted unique ``rows`` that do
    not cross a multiple of ``boundary`` (a store's segment): positions ``firsts[j]:firsts[j] +
    lengths[j]`` of ``rows``. Both ``[runs]`` int64."""
    n = rows.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    starts = [torch.zeros(1, dtype=torch.long)]
    for a in range(0, n - 1, PIECE):
        b = min(a + PIECE, n - 1)
        after = rows[a + 1:b + 1]
        breaks = (after != rows[a:b] + 1) | (after.remainder(boundary) == 0)
        starts.append(breaks.nonzero().flatten().add_(a + 1))
    firsts = torch.cat(starts)
    return firsts, torch.diff(firsts, append=torch.tensor([n]))


def run_positions(firsts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Every position of the runs ``(firsts, lengths)``, ascending: ``[sum(lengths)]`` int64."""
    total = int(lengths.sum())
    offsets = torch.repeat_interleave(firsts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    return offsets.add_(torch.arange(total))


def lookup(table: torch.Tensor, ids: torch.Tensor, piece: int | None = None):
    """Per piece of ``ids`` (``piece`` ids, default :data:`PIECE`): ``(start, pos, found)``, ``pos[k]``
    the position of ``ids[start + k]`` in sorted unique ``table`` (nonempty) where ``found[k]``, else a
    valid position of another row."""
    last, piece = table.numel() - 1, piece or PIECE
    for a in range(0, ids.numel(), piece):
        part = ids[a:a + piece]
        pos = torch.searchsorted(table, part).clamp_(max=last)
        yield a, pos, table.index_select(0, pos) == part
