"""Collectives the class-sharded head is built from.

Every function takes a ``group`` (``None`` = the default world group) and degrades to a no-op when
torch.distributed is not initialised or the group has one rank, so single-process code paths run the
same code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .init import get_rank, get_world_size


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce; returns ``tensor``."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_table(row: torch.Tensor, group=None) -> torch.Tensor:
    """Gather one small 1-D int64 tensor per rank into ``[world, len(row)]`` (rank order)."""
    world = get_world_size(group)
    if world == 1:
        return row.unsqueeze(0)
    out = torch.empty(world * row.numel(), dtype=row.dtype, device=row.device)
    dist.all_gather_into_tensor(out, row.contiguous(), group=group)
    return out.view(world, row.numel())


def _gather_padded(local: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All-gather rows of possibly different counts per rank: ``[sum(sizes), ...]`` in rank order."""
    world, longest = len(sizes), max(sizes)
    padded = local.new_zeros((longest,) + local.shape[1:]) if local.shape[0] != longest else local
    if padded is not local:
        padded[: local.shape[0]] = local
    out = local.new_empty((world * longest,) + local.shape[1:])
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    if all(s == longest for s in sizes):
        return out
    keep = torch.cat([torch.arange(r * longest, r * longest + s, device=local.device)
                      for r, s in enumerate(sizes)])
    return out.index_select(0, keep)


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
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out[: sizes[rank]], None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (``[sizes[r], ...]`` on rank r) in rank order.

    Differentiable: the backward sums the gradient over ranks and returns each rank its own rows,
    so ``local.grad`` is the gradient of a loss that is identical on every rank (not W times it).
    """
    if get_world_size(group) == 1:
        return local
    sizes = [int(s) for s in sizes]
    if local.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(local, sizes, group)
    return _gather_padded(local, sizes, group)
