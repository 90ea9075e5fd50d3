"""Every collective of the package: plain ones, autograd ones (forward and backward side by side), and the
pipelined pieces of the head's gather.

Every function takes a ``group`` (``None`` = the default world group) and degrades to a no-op when
torch.distributed is not initialised or the group has one rank, so single-process code paths run the
same code.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist

from .init import get_rank, get_world_size

# torch 2.13 renamed the flat-tensor collectives; the old names warn on every call.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce; returns ``tensor``."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


@torch.no_grad()
def average_batchnorm_stats_(module: torch.nn.Module, group=None) -> int:
    """Replace every BatchNorm's running mean and variance in ``module`` by their mean over the
    ranks of ``group`` (collective; returns the number of layers). Data-parallel ranks update them
    from different batches; DeepSpeed checkpoints keep rank 0's only, and eval mode (evaluation,
    CAMs) should see one model: call before saving and before evaluating."""
    stats = [t for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
             and m.track_running_stats and m.running_mean is not None for t in (m.running_mean, m.running_var)]
    if not stats or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return len(stats) // 2
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in stats])
    all_reduce_(flat, dist.ReduceOp.SUM, group).div_(dist.get_world_size(group))
    for t, part in zip(stats, flat.split([t.numel() for t in stats])):
        t.copy_(part.view_as(t))
    return len(stats) // 2


def all_gather_table(row: torch.Tensor, group=None) -> torch.Tensor:
    """Gather one small 1-D int64 tensor per rank into ``[world, len(row)]`` (rank order)."""
    world = get_world_size(group)
    if world == 1:
        return row.unsqueeze(0)
    out = torch.empty(world * row.numel(), dtype=row.dtype, device=row.device)
    _all_gather_flat(out, row.contiguous(), group=group)
    return out.view(world, row.numel())


def _gather_padded(local: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All-gather rows of possibly different counts per rank: ``[sum(sizes), ...]`` in rank order."""
    world, longest = len(sizes), max(sizes)
    padded = local.new_zeros((longest,) + local.shape[1:]) if local.shape[0] != longest else local
    if padded is not local:
        padded[: local.shape[0]] = local
    out = local.new_empty((world * longest,) + local.shape[1:])
    _all_gather_flat(out, padded.contiguous(), group=group)
    if all(s == longest for s in sizes):
        return out
    keep = torch.cat([torch.arange(r * longest, r * longest + s, device=local.device)
                      for r, s in enumerate(sizes)])
    return out.index_select(0, keep)


# ---------------------------------------------------------------------- autograd collectives
# Each states its forward and its backward; together they are every gradient rule the package's
# rank protocols use (the head's fused loss has its own pieces below).

class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        return all_reduce_(tensor.clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: all-reduce SUM over ``group``. Backward: identity.

    For partial sums of a loss that every rank then holds in full: each rank back-propagates the same
    loss through its own part only, and the embedding gather's reduce-scatter sums the parts, so the
    gradient must not be summed a second time here."""
    if get_world_size(group) == 1:
        return tensor
    return _SumOverRanks.apply(tensor, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Forward: identity. Backward: the gradient times ``factor`` (e.g. the data-parallel size, so that
    a data-parallel wrapper's AVERAGE over ranks becomes the SUM the head needs)."""
    return _ScaleGrad.apply(x, factor)


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather of rows. Backward: reduce-scatter (sum) of the gradient back to owners.

    Every rank computes a partial gradient of the same global loss for ALL gathered rows (from its
    own classes); the true gradient of a rank's rows is the sum of those partials over ranks.
    """

    @staticmethod
    def forward(ctx, local, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.sizes, ctx.group
        world, longest, rank = len(sizes), max(sizes), get_rank(group)
        if any(s != longest for s in sizes):
            padded = grad.new_zeros((world * longest,) + grad.shape[1:])
            offset = 0
            for r, s in enumerate(sizes):
                padded[r * longest: r * longest + s] = grad[offset: offset + s]
                offset += s
            grad = padded
        out = grad.new_empty((longest,) + grad.shape[1:])
        _reduce_scatter_flat(out, grad.contiguous(), group=group)
        return out[: sizes[rank]], None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Forward: all-gather of every rank's ``local`` rows (``[sizes[r], ...]`` on rank r) in rank
    order. Backward: reduce-scatter (sum) of the gradient back to the rows' owners.

    Differentiable: the backward sums the gradient over ranks and returns each rank its own rows,
    so ``local.grad`` is the gradient of a loss that is identical on every rank (not W times it).
    """
    if get_world_size(group) == 1:
        return local
    sizes = [int(s) for s in sizes]
    if local.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(local, sizes, group)
    return _gather_padded(local, sizes, group)


# ---------------------------------------------------------------------- pipelined pieces of the head's gather
class PieceLayout:
    """How a rank-major global batch is moved in ``pieces`` collectives.

    Rank r holds ``sizes[r]`` rows. Piece p carries local rows ``[p*m, (p+1)*m)`` of every rank
    (``m = ceil(max(sizes) / pieces)``, short ranks padded), as one ``[W*m, ...]`` buffer. ``rows(p)``
    gives, for the valid entries of that buffer, their positions in it and their global (rank-major)
    row indices.
    """

    def __init__(self, sizes: Sequence[int], pieces: int, rank: int, device):
        self.sizes, self.rank = [int(s) for s in sizes], rank
        longest = max(self.sizes)
        self.pieces = max(1, min(int(pieces), longest))
        self.m = -(-longest // self.pieces)
        offsets = torch.tensor([0] + self.sizes[:-1], device=device).cumsum(0)
        sizes_t = torch.tensor(self.sizes, device=device)
        self._layout = []
        for p in range(self.pieces):
            local = torch.arange(p * self.m, (p + 1) * self.m, device=device)
            valid = local.unsqueeze(0) < sizes_t.unsqueeze(1)                      # [W, m]
            position = torch.arange(len(self.sizes) * self.m, device=device).view(-1, self.m)
            self._layout.append((position[valid], (offsets.unsqueeze(1) + local.unsqueeze(0))[valid]))

    def rows(self, piece: int):
        """``(buffer_positions[n], global_rows[n])`` of piece ``piece``."""
        return self._layout[piece]

    def local_slice(self, piece: int) -> slice:
        """This rank's local rows carried by piece ``piece``."""
        lo = min(piece * self.m, self.sizes[self.rank])
        return slice(lo, min((piece + 1) * self.m, self.sizes[self.rank]))


class CommTimer:
    """Counts a step's asynchronous collectives and the time spent blocked waiting for them.

    ``exposed_s`` is the communication time NOT hidden behind computation. With one piece every
    collective is waited for right away, so ``exposed_s`` is then the whole communication time; the
    hidden share of a pipelined run is ``1 - exposed(pieces) / exposed(1)`` (see
    ``benchmarks/pipeline_overlap.py``).
    """

    def __init__(self):
        self.collectives, self.bytes, self.exposed_s = 0, 0, 0.0

    def track(self, work, tensor: torch.Tensor):
        self.collectives += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return work

    def wait(self, work):
        start = time.perf_counter()
        work.wait()
        self.exposed_s += time.perf_counter() - start

    def summary(self) -> dict:
        return {"collectives": self.collectives, "bytes": self.bytes, "exposed_s": self.exposed_s}


def all_gather_pieces(local: torch.Tensor, layout: PieceLayout, group, timer: CommTimer):
    """Issue one async all-gather per piece at once; yield ``(piece, rows[n, ...], global_rows[n])``
    in order, waiting for each piece only when it is needed."""
    handles = []
    for p in range(layout.pieces):
        part = local[layout.local_slice(p)]
        send = local.new_zeros((layout.m,) + local.shape[1:])
        send[: part.shape[0]] = part
        out = local.new_empty((len(layout.sizes) * layout.m,) + local.shape[1:])
        work = _all_gather_flat(out, send, group=group, async_op=True)
        handles.append((out, timer.track(work, out)))
    for p, (out, work) in enumerate(handles):
        timer.wait(work)
        positions, global_rows = layout.rows(p)
        yield p, out.index_select(0, positions), global_rows


class ReduceScatterPieces:
    """Send each piece's gradient ``[n, ...]`` (rows as in :meth:`PieceLayout.rows`) as soon as it is
    ready; :meth:`finish` returns this rank's rows summed over ranks, ``[sizes[rank], ...]``."""

    def __init__(self, layout: PieceLayout, like: torch.Tensor, group, timer: CommTimer):
        self.layout, self.group, self.timer, self.like, self.pending = layout, group, timer, like, []

    def submit(self, piece: int, grad_rows: torch.Tensor) -> None:
        positions, _ = self.layout.rows(piece)
        buffer = grad_rows.new_zeros((len(self.layout.sizes) * self.layout.m,) + grad_rows.shape[1:])
        buffer.index_copy_(0, positions, grad_rows)
        out = grad_rows.new_empty((self.layout.m,) + grad_rows.shape[1:])
        work = _reduce_scatter_flat(out, buffer, group=self.group, async_op=True)
        self.pending.append((piece, out, self.timer.track(work, buffer)))

    def finish(self) -> torch.Tensor:
        result = self.like.new_empty((self.layout.sizes[self.layout.rank],) + self.like.shape[1:])
        for piece, out, work in self.pending:
            self.timer.wait(work)
            keep = self.layout.local_slice(piece)
            result[keep] = out[: keep.stop - keep.start]
        return result
