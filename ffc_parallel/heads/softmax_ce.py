"""Fused, chunked, distributed margin-softmax cross-entropy over a class-sharded weight.

Each rank holds the rows ``weight[num_local, D]`` of its classes and sees the whole (gathered,
normalised) global batch ``xn[B, D]``. The loss is

    loss = mean_b( logsumexp_over_all_ranks(logits[b, :]) - logits[b, y_b] ),
    logits[b, j] = s * cos(x_b, w_j)   (target: s * f(cos), see margins.py)

computed chunk by chunk over the local classes, never materialising ``[B, num_local]``:

* forward: per chunk one GEMM ``xn @ w_c.T``; an online log-sum-exp keeps the running row max and
  sum; two all-reduces (MAX of the row max, SUM of the rescaled sums stacked with the target logit)
  combine the ranks. Extra memory is about three ``[B, chunk]`` buffers.
* backward: per chunk ``G = d loss / d cos`` (softmax minus one-hot, margin derivative on the
  target), then ``d xn += G @ w_c`` and ``d w_c = G.T @ xn`` minus the normalisation's radial part.
  Cosines of the leading chunks that fit the memory budget are kept from the forward; the others
  are recomputed (one extra GEMM for those chunks only). With the default budget, small shards keep
  everything and run exactly three matrix products.

The function returns this rank's partial gradient for ``xn`` (from its own classes); summing it
over ranks (the reduce-scatter in :func:`ffc_parallel.distributed.gather_rows`) gives the full one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.collectives import all_reduce_
from .margins import CombinedMargin

DEFAULT_MEMORY_BUDGET_MB = 256
_WORK_BUFFERS = 3  # [B, chunk] buffers alive at once inside a chunk step


@dataclass(frozen=True)
class ChunkPlan:
    """How the local classes are walked: ``chunk`` classes at a time, the first ``cached`` chunks'
    cosines kept between forward and backward."""

    chunk: int
    cached: int

    @staticmethod
    def for_budget(batch: int, num_cols: int, elem_bytes: int, budget_bytes: int,
                   chunk_size: int | None = None) -> "ChunkPlan":
        """Largest chunk whose work buffers use at most a quarter of ``budget_bytes``; the rest of
        the budget caches cosines. ``chunk_size`` overrides the chunk."""
        row_bytes = max(batch, 1) * elem_bytes
        if chunk_size is None:
            chunk_size = max(1, budget_bytes // (4 * _WORK_BUFFERS * row_bytes))
        chunk = max(1, min(int(chunk_size), max(num_cols, 1)))
        spare = budget_bytes - _WORK_BUFFERS * row_bytes * chunk
        cached = max(0, spare // (row_bytes * chunk)) if spare > 0 else 0
        return ChunkPlan(chunk, int(min(cached, math.ceil(num_cols / chunk))))


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp statistics and elementwise softmax work (fp32 at least)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


@dataclass
class Targets:
    """What each sample of the global batch is scored against (tensors on the weight's device).

    cols: ``[B, T]`` column of each target among the used local rows, -1 where another rank owns the
        class. Column 0 is the sample's label, the only target that gets the margin.
    q: ``[B, T]`` target probabilities (each row sums to 1), or None for ``T = 1``, ``q = 1``.
    class_weight_part: ``[B]`` the label's class weight where this rank owns the label, 0 elsewhere
        (summed over ranks into ``w_y``), or None for unit weights.
    """

    cols: torch.Tensor
    q: torch.Tensor | None = None
    class_weight_part: torch.Tensor | None = None


def _targets_in(cols, start, stop):
    """Entries ``(rows, cols - start, t)`` of the ``[B, T]`` target table inside columns start:stop."""
    rows, t = ((cols >= start) & (cols < stop)).nonzero(as_tuple=True)
    return rows, cols[rows, t] - start, t


def _chunk_logits(cos, rows, cols, t, margin: CombinedMargin, filter_threshold, inplace):
    """Logits of one chunk from its cosines; returns ``(logits, filtered_mask or None)``.

    Targets ``t == 0`` get the margin. Non-target cosines above ``filter_threshold`` get logit 0
    (insightface's interclass filtering).
    """
    label = t == 0
    label_cos = cos[rows[label], cols[label]]
    mask = None
    if filter_threshold is not None:
        mask = cos > filter_threshold
        mask[rows, cols] = False
    logits = cos if inplace else cos.clone()
    if mask is not None:
        logits.masked_fill_(mask, 0.0)
    logits.mul_(margin.s)
    logits[rows[label], cols[label]] = margin.s * margin.target(label_cos)
    return logits, mask


def _chunks(n, chunk):
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """``loss = f(xn[B, D], weight[num_local, D])``; see the module docstring.

    With target probabilities ``q`` (soft targets) each sample's target log-likelihood is
    ``l_b = sum_t q_bt * log p_b,t`` over the global softmax; ``row_loss(l[B], w_y[B])`` turns it into
    the loss and its derivative ``dloss/dl`` (default: ``-mean(l)``), so that
    ``d loss / d logit_bj = dloss/dl_b * (q_bj - p_bj)``.

    Args (non-tensor ones get no gradient):
        rows: ``[S]`` sorted local row indices to use (Partial FC) or None for all rows.
        targets: a :class:`Targets` for the global batch.
        plan: a :class:`ChunkPlan`. group: the process group the classes are sharded over.
        row_loss: a :class:`~ffc_parallel.heads.row_loss.RowLoss`.
    """

    @staticmethod
    def forward(ctx, xn, weight, rows, targets, margin, filter_threshold, plan, group, row_loss):
        batch, sdt = xn.shape[0], stats_dtype(xn.dtype)
        num_cols = weight.shape[0] if rows is None else rows.numel()
        need_grad = any(ctx.needs_input_grad[:2])
        q = targets.q.to(sdt) if targets.q is not None else torch.ones_like(targets.cols, dtype=sdt)
        run_max = torch.full((batch,), -math.inf, dtype=sdt, device=xn.device)
        run_sum = torch.zeros(batch, dtype=sdt, device=xn.device)
        target_logit = torch.zeros(batch, dtype=sdt, device=xn.device)   # sum_t q_t * z_t (local part)
        cache = []
        for index, (start, stop) in enumerate(_chunks(num_cols, plan.chunk)):
            cos = chunk_cosines(xn, *chunk_rows(weight, rows, start, stop, sdt))
            keep = need_grad and index < plan.cached
            if keep:
                cache.append(cos)
            t_rows, t_cols, t = _targets_in(targets.cols, start, stop)
            logits, _ = _chunk_logits(cos, t_rows, t_cols, t, margin, filter_threshold, inplace=not keep)
            target_logit.index_add_(0, t_rows, q[t_rows, t] * logits[t_rows, t_cols])
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum.mul_(torch.exp(run_max - new_max))
            logits.sub_(new_max.unsqueeze(1)).exp_()
            run_sum.add_(logits.sum(dim=1))
            run_max = new_max
        global_max = all_reduce_(run_max.clone(), dist.ReduceOp.MAX, group)
        # A rank without classes has run_max = -inf: its sum contributes exp(-inf) * 0 = 0.
        parts = [run_sum * torch.exp(run_max - global_max), target_logit]
        if targets.class_weight_part is not None:
            parts.append(targets.class_weight_part.to(sdt))
        summed = all_reduce_(torch.stack(parts, dim=1), dist.ReduceOp.SUM, group)
        log_z = global_max + torch.log(summed[:, 0])
        class_weight = summed[:, 2] if targets.class_weight_part is not None else None
        loss, dloss_dl = row_loss(summed[:, 1] - log_z, class_weight)
        ctx.save_for_backward(xn, weight, rows, log_z, dloss_dl.to(sdt))
        ctx.targets, ctx.q, ctx.cache = targets, q, cache
        ctx.margin, ctx.filter_threshold, ctx.plan = margin, filter_threshold, plan
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xn, weight, rows, log_z, dloss_dl = ctx.saved_tensors
        margin, plan, cache, targets, q = ctx.margin, ctx.plan, ctx.cache, ctx.targets, ctx.q
        want_x, want_w = ctx.needs_input_grad[:2]
        sdt = log_z.dtype
        row_coef = (grad_loss.to(sdt) * dloss_dl).unsqueeze(1)    # d loss / d l_b
        num_cols = weight.shape[0] if rows is None else rows.numel()
        grad_x = torch.zeros(xn.shape, dtype=sdt, device=xn.device) if want_x else None
        grad_w = None
        if want_w:
            grad_w = torch.empty_like(weight) if rows is None else torch.zeros_like(weight)
        for index, (start, stop) in enumerate(_chunks(num_cols, plan.chunk)):
            w_c, inv = chunk_rows(weight, rows, start, stop, sdt)
            cos = cache[index] if index < len(cache) else None
            if cos is None:  # not kept, or freed by an earlier backward through the same graph
                cos = chunk_cosines(xn, w_c, inv)
            else:
                cache[index] = None
            t_rows, t_cols, t = _targets_in(targets.cols, start, stop)
            grad, mask = _chunk_logits(cos, t_rows, t_cols, t, margin, ctx.filter_threshold, inplace=False)
            grad.sub_(log_z.unsqueeze(1)).exp_().mul_(row_coef.neg())   # -dl * p
            grad.index_put_((t_rows, t_cols), row_coef[t_rows, 0] * q[t_rows, t], accumulate=True)
            label = t == 0                                              # d logit / d cos: s (label: s f')
            l_rows, l_cols = t_rows[label], t_cols[label]
            grad[l_rows, l_cols] *= margin.target_grad(cos[l_rows, l_cols])
            if mask is not None:
                grad.masked_fill_(mask, 0.0)
            grad.mul_(inv).mul_(margin.s)                               # d loss / d (xn . w_c)
            g = grad if grad.dtype == xn.dtype else grad.to(xn.dtype)
            if want_x:
                if g.dtype == sdt:
                    grad_x.addmm_(g, w_c)
                else:
                    grad_x.add_(torch.mm(g, w_c))
            if want_w:
                g_w = torch.mm(g.t(), xn)
                radial = grad.mul_(cos).sum(dim=0).mul_(inv)            # sum_b G cos / |w|
                g_w.sub_(w_c * radial.unsqueeze(1).to(w_c.dtype))
                if rows is None:
                    grad_w[start:stop] = g_w
                else:
                    grad_w.index_copy_(0, rows[start:stop], g_w)
        if grad_x is not None and grad_x.dtype != xn.dtype:
            grad_x = grad_x.to(xn.dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None
