"""Fused, chunked, distributed margin-softmax cross-entropy over a class-sharded weight.

Each rank holds the rows ``weight[num_local, D]`` of its classes and its local embeddings
``x[b, D]``; the function gathers the global batch (``B`` rows, rank-major) and normalises it. The
loss is

    loss = mean_b( logsumexp_over_all_ranks(logits[b, :]) - logits[b, y_b] ),
    logits[b, j] = s * cos(x_b, w_j)   (target: s * f(cos), see margins.py)

computed chunk by chunk over the local classes, never materialising ``[B, num_local]``:

* gather: the global batch arrives in ``pieces`` asynchronous all-gathers, all issued at once; the
  classes are walked for piece p while pieces p+1.. are still in flight.
* forward: per chunk one GEMM ``xn @ v_c.T`` with ``v_c = s * w_c / |w_c|`` gives the logits; an
  online log-sum-exp per row is combined across ranks by two all-reduces (MAX of the row
  log-sum-exp, SUM of the rescaled sums stacked with the target logit). Extra memory is a few
  ``[B, chunk]`` buffers.
* backward: per chunk ``G = d loss / d logit`` (softmax minus targets, margin derivative on the
  label), then ``d xn += G @ v_c`` and ``d v_c = G.T @ xn`` mapped to ``d w_c`` through the
  normalisation (an ``[n, D]`` operation). ``exp(logit - row max)`` of the leading chunks that fit
  the memory budget is kept from the forward (the softmax is then one multiply); the others are
  recomputed (one extra GEMM for those chunks only). With the default budget, small shards keep
  everything and run exactly three matrix products. The backward walks the pieces in order and
  reduce-scatters each piece's embedding gradient (summed over ranks, since every rank holds a part
  of every sample's softmax) while the next piece is computed. With more than one piece the center
  gradient is accumulated once per piece.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed.collectives import (CommTimer, PieceLayout, ReduceScatterPieces, all_gather_pieces,
                                       all_reduce_)
from .margins import CombinedMargin

DEFAULT_MEMORY_BUDGET_MB = 256
_WORK_BUFFERS = 3  # [B, chunk] buffers alive at once inside a chunk step


@dataclass(frozen=True)
class ChunkPlan:
    """How the local classes are walked: ``chunk`` classes at a time, the first ``cached`` chunks'
    exponentiated logits kept between forward and backward."""

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


def _scaled_rows(weight, rows, start, stop, sdt, scale):
    """``(v_c[n, D] = scale * w_c / |w_c|, scale / |w_c| [n] in sdt)``: one GEMM with ``v_c`` gives the
    unmargined logits ``scale * cos`` directly (normalising the ``[n, D]`` rows is cheaper than
    rescaling the ``[B, n]`` product when D < B)."""
    w_c, inv = chunk_rows(weight, rows, start, stop, sdt)
    a = inv.mul_(scale)
    return w_c * a.unsqueeze(1).to(w_c.dtype), a


def _raw_logits(xn, v_c, sdt):
    logits = torch.mm(xn, v_c.t())
    return logits.to(sdt) if logits.dtype != sdt else logits


def _finish_logits_(logits, rows, cols, t, margin: CombinedMargin, filter_threshold):
    """In place: the margin on label entries (``t == 0``), logit 0 for non-target entries above
    ``s * filter_threshold`` (insightface's interclass filtering). Returns ``(label_cos, mask)``: the
    labels' unmargined cosines and the filtered entries (or None)."""
    label = t == 0
    l_rows, l_cols = rows[label], cols[label]
    label_cos = (logits[l_rows, l_cols] / margin.s).clamp_(-1.0, 1.0)
    mask = None
    if filter_threshold is not None:
        mask = logits > margin.s * filter_threshold
        mask[rows, cols] = False
        logits.masked_fill_(mask, 0.0)
    logits[l_rows, l_cols] = margin.s * margin.target(label_cos)
    return label_cos, mask


def _chunks(n, chunk):
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _target_slice(targets: Targets, q: torch.Tensor, rows: torch.Tensor):
    """The target table restricted to global rows ``rows``: ``(cols[n, T], q[n, T])``."""
    return targets.cols.index_select(0, rows), q.index_select(0, rows)


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """``loss = f(x_local[b, D], weight[num_local, D])``; see the module docstring.

    With target probabilities ``q`` (soft targets) each sample's target log-likelihood is
    ``l_b = sum_t q_bt * log p_b,t`` over the global softmax; ``row_loss(l[B], w_y[B])`` turns it into
    the loss and its derivative ``dloss/dl`` (default: ``-mean(l)``), so that
    ``d loss / d logit_bj = dloss/dl_b * (q_bj - p_bj)``.

    Args (non-tensor ones get no gradient):
        rows: ``[S]`` sorted local row indices to use (Partial FC) or None for all rows.
        targets: a :class:`Targets` for the global (rank-major) batch.
        plan: a :class:`ChunkPlan`. group: the process group the classes are sharded over.
        row_loss: a :class:`~ffc_parallel.heads.row_loss.RowLoss`.
        layout: a :class:`~ffc_parallel.distributed.collectives.PieceLayout` (None: one process).
        comm_stats: a dict that receives the forward/backward :class:`CommTimer` summaries.
        accumulate_rows: with ``rows``, add the center gradient of those rows straight into
            ``weight.grad`` (allocated with zeros if None) instead of returning a dense
            ``[num_local, D]`` gradient, so a step costs O(rows) once ``weight.grad`` exists (the
            engine zeroes only the touched rows after its step).
    """

    @staticmethod
    def forward(ctx, x_local, weight, rows, targets, margin, filter_threshold, plan, group, row_loss,
                layout, comm_stats, accumulate_rows=False):
        sdt = stats_dtype(x_local.dtype)
        device = x_local.device
        batch = x_local.shape[0] if layout is None else sum(layout.sizes)
        num_cols = weight.shape[0] if rows is None else rows.numel()
        need_grad = any(ctx.needs_input_grad[:2])
        q = targets.q.to(sdt) if targets.q is not None else torch.ones_like(targets.cols, dtype=sdt)
        xn = x_local.new_empty((batch, x_local.shape[1]))
        norms = torch.empty(batch, 1, dtype=x_local.dtype, device=device)
        run_lse = torch.empty(batch, dtype=sdt, device=device)
        target_logit = torch.empty(batch, dtype=sdt, device=device)   # sum_t q_t * z_t (local part)
        label_cos = torch.zeros(batch, dtype=sdt, device=device)      # unmargined cosine of own labels
        cache, cache_left = {}, plan.cached * plan.chunk * batch if need_grad else 0
        timer = CommTimer()
        pieces = ([(0, x_local, torch.arange(batch, device=device))] if layout is None
                  else all_gather_pieces(x_local, layout, group, timer))
        for piece, x_p, global_rows in pieces:
            norms_p = torch.linalg.vector_norm(x_p, dim=1, keepdim=True).clamp_min_(1e-12)
            xn_p = x_p / norms_p
            xn[global_rows], norms[global_rows] = xn_p, norms_p
            cols_p, q_p = _target_slice(targets, q, global_rows)
            n = xn_p.shape[0]
            p_lse = torch.full((n,), -math.inf, dtype=sdt, device=device)
            p_target = torch.zeros(n, dtype=sdt, device=device)
            for index, (start, stop) in enumerate(_chunks(num_cols, plan.chunk)):
                logits = _raw_logits(xn_p, _scaled_rows(weight, rows, start, stop, sdt, margin.s)[0], sdt)
                t_rows, t_cols, t = _targets_in(cols_p, start, stop)
                cos_l, mask = _finish_logits_(logits, t_rows, t_cols, t, margin, filter_threshold)
                label_cos[global_rows[t_rows[t == 0]]] = cos_l
                p_target.index_add_(0, t_rows, q_p[t_rows, t] * logits[t_rows, t_cols])
                row_max = logits.amax(dim=1, keepdim=True)
                exps = logits.sub_(row_max).exp_()                    # in place: exp(logit - row max)
                torch.logaddexp(p_lse, row_max.squeeze(1) + exps.sum(dim=1).log_(), out=p_lse)
                if exps.numel() <= cache_left:  # the backward turns these into softmax with one multiply
                    cache[piece, index], cache_left = (exps, row_max, mask), cache_left - exps.numel()
            run_lse[global_rows], target_logit[global_rows] = p_lse, p_target
        global_max = all_reduce_(run_lse.clone(), dist.ReduceOp.MAX, group)
        # A rank without classes has run_lse = -inf: it contributes exp(-inf) = 0.
        parts = [torch.exp(run_lse - global_max), target_logit]
        if targets.class_weight_part is not None:
            parts.append(targets.class_weight_part.to(sdt))
        summed = all_reduce_(torch.stack(parts, dim=1), dist.ReduceOp.SUM, group)
        log_z = global_max + torch.log(summed[:, 0])
        class_weight = summed[:, 2] if targets.class_weight_part is not None else None
        loss, dloss_dl = row_loss(summed[:, 1] - log_z, class_weight)
        ctx.save_for_backward(xn, norms, weight, rows, log_z, dloss_dl.to(sdt), label_cos)
        ctx.targets, ctx.q, ctx.cache, ctx.layout, ctx.group = targets, q, cache, layout, group
        ctx.margin, ctx.filter_threshold, ctx.plan, ctx.comm_stats = margin, filter_threshold, plan, comm_stats
        ctx.accumulate_into = weight if accumulate_rows and rows is not None else None
        if comm_stats is not None:
            comm_stats["forward"] = timer.summary()
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xn, norms, weight, rows, log_z, dloss_dl, label_cos = ctx.saved_tensors
        margin, plan, cache, layout = ctx.margin, ctx.plan, ctx.cache, ctx.layout
        want_x, want_w = ctx.needs_input_grad[:2]
        sdt, device = log_z.dtype, xn.device
        coef = grad_loss.to(sdt) * dloss_dl                      # d loss / d l_b   [B]
        # d loss / d logit = coef * (q - p); fold -coef into the exponent when it is positive everywhere.
        fold = bool((coef < 0).all())
        shift = log_z - torch.log(-coef) if fold else log_z
        num_cols = weight.shape[0] if rows is None else rows.numel()
        num_pieces = 1 if layout is None else layout.pieces
        grad_w, param = None, ctx.accumulate_into
        if want_w and param is not None:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad_w = param.grad
        elif want_w:
            grad_w = torch.empty_like(weight) if rows is None and num_pieces == 1 else torch.zeros_like(weight)
        timer = CommTimer()
        scatter = None if layout is None else ReduceScatterPieces(layout, xn, ctx.group, timer)
        grad_x = None
        for piece in range(num_pieces):
            global_rows = torch.arange(xn.shape[0], device=device) if layout is None else layout.rows(piece)[1]
            xn_p, coef_p = xn.index_select(0, global_rows), coef.index_select(0, global_rows).unsqueeze(1)
            cols_p, q_p = _target_slice(ctx.targets, ctx.q, global_rows)
            shift_p = shift.index_select(0, global_rows).unsqueeze(1)
            log_z_p = log_z.index_select(0, global_rows).unsqueeze(1)
            cos_p = label_cos.index_select(0, global_rows)
            grad_xn_p = torch.zeros(xn_p.shape, dtype=sdt, device=device) if want_x else None
            for index, (start, stop) in enumerate(_chunks(num_cols, plan.chunk)):
                v_c, a = _scaled_rows(weight, rows, start, stop, sdt, margin.s)
                t_rows, t_cols, t = _targets_in(cols_p, start, stop)
                cached = cache.pop((piece, index), None)  # gone after a first backward: recompute
                if cached is not None:
                    grad, row_max, mask = cached                            # exp(logit - row max)
                    grad.mul_(torch.exp(row_max - log_z_p).mul_(coef_p.neg()))   # -coef * p
                else:
                    grad = _raw_logits(xn_p, v_c, sdt)
                    mask = _finish_logits_(grad, t_rows, t_cols, t, margin, ctx.filter_threshold)[1]
                    grad.sub_(shift_p).exp_()                               # -coef * p
                    if not fold:
                        grad.mul_(coef_p.neg())
                grad.index_put_((t_rows, t_cols), coef_p[t_rows, 0] * q_p[t_rows, t], accumulate=True)
                label = t == 0                                              # the label's logit is s f(cos)
                grad[t_rows[label], t_cols[label]] *= margin.target_grad(cos_p[t_rows[label]])
                if mask is not None:
                    grad.masked_fill_(mask, 0.0)
                g = grad if grad.dtype == xn.dtype else grad.to(xn.dtype)  # d loss / d (xn . v_c)
                if want_x and g.dtype == sdt:
                    grad_xn_p.addmm_(g, v_c)
                elif want_x:
                    grad_xn_p.add_(torch.mm(g, v_c))
                if want_w:  # v = s w / |w|:  d w = (s/|w|) (d v - w^ (w^ . d v))
                    direct = rows is None and num_pieces == 1
                    g_v = torch.mm(g.t(), xn_p, out=grad_w[start:stop]) if direct else torch.mm(g.t(), xn_p)
                    radial = (g_v * v_c).sum(dim=1, keepdim=True).div_(margin.s ** 2)
                    g_w = g_v.sub_(v_c * radial).mul_(a.unsqueeze(1).to(g_v.dtype))
                    if rows is not None:
                        grad_w.index_add_(0, rows[start:stop], g_w.to(grad_w.dtype))
                    elif not direct:
                        grad_w[start:stop] += g_w
            if want_x:  # through the normalisation: (I - xn xn^T) / |x|
                grad_xn_p.sub_(xn_p * (grad_xn_p * xn_p).sum(dim=1, keepdim=True))
                grad_x_p = grad_xn_p.div_(norms.index_select(0, global_rows)).to(xn.dtype)
                if scatter is None:
                    grad_x = grad_x_p
                else:
                    scatter.submit(piece, grad_x_p)
        if want_x and scatter is not None:
            grad_x = scatter.finish()
        if ctx.comm_stats is not None:
            ctx.comm_stats["backward"] = timer.summary()
        if param is not None:
            grad_w = None  # already in weight.grad
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None
