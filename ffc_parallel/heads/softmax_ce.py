"""Fused, chunked, distributed margin-softmax cross-entropy over a class-sharded weight.

Each rank holds the rows ``weight[num_local, D]`` of its classes and its local embeddings
``x[b, D]``; the function gathers the global batch (``B`` rows, rank-major) and normalises it. The
loss is

    loss = mean_b( logsumexp_over_all_ranks(logits[b, :]) - logits[b, y_b] ),
    logits[b, j] = s * cos(x_b, w_j)   (target: s * f(cos), see margins.py)

computed tile by tile over the local classes, never materialising ``[B, num_local]``:

* gather: the global batch arrives in ``pieces`` asynchronous all-gathers, all issued at once; the
  classes are walked for piece p while pieces p+1.. are still in flight.
* forward: per tile one GEMM ``xn @ v_c.T`` with ``v_c = s log2(e) w_c / |w_c|`` gives the logits in
  base-2 units (``exp2`` is cheaper than ``exp`` on CPU); an online log-sum-exp per row is combined
  across ranks by two all-reduces (MAX of the row log-sum-exp, SUM of the rescaled sums stacked with
  the target logit). ``s log2(e) / |w|`` is computed once and kept for the backward.
* backward: per tile ``G = d loss / d logit`` (softmax minus targets, margin derivative on the
  label), then ``d xn += G @ v_c`` and ``d v_c = G.T @ xn`` mapped to ``d w_c`` through the
  normalisation (an ``[n, D]`` operation). ``exp2(logit - row max)`` of the leading tiles that fit
  the cache part of the memory budget is kept from the forward (the softmax is then one multiply);
  the others are recomputed (one extra GEMM for those tiles only). With the default budget, small
  shards keep everything and run exactly three matrix products. The backward walks the pieces in
  order and reduce-scatters each piece's embedding gradient (summed over ranks, since every rank holds
  a part of every sample's softmax) while the next piece is computed. With more than one piece the
  center gradient is accumulated once per piece.

Memory: the :class:`ChunkPlan` (from the budget) fixes how many logits may be cached. The compute
tile is the plan's chunk on accelerators; on CPU it is capped at ``CPU_TILE_BYTES`` per ``[B, tile]``
buffer so that the elementwise passes after each GEMM run in the last-level cache. All work buffers
(one ``[B, tile]``, up to three ``[tile, D]``) are allocated once per call and reused.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

import torch

from ..distributed.collectives import CommTimer, ReduceScatterPieces, all_gather_pieces
from .borrowed_grad import BorrowedGradient, borrowed_columns, borrows_gradient  # noqa: F401
from .chunking import (DEFAULT_MEMORY_BUDGET_MB, ChunkPlan, TileTargets, chunk_cosines, chunk_rows,  # noqa: F401
                       stats_dtype, tiles)
from .logit_cache import LogitCache
from .stages import (LN2, LOG2E, center_grad_, combine_over_ranks, embedding_grad_, margin_and_filter_, normalized,
                     online_lse_, scaled_rows_, softmax_from_cache_, softmax_from_logits_, softmax_grad_,
                     target_logits_, tile_logits_)
_GRAD_MODE = contextvars.ContextVar("ffc_grad_mode", default=True)  # grad mode of the caller of apply


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
        accumulate: add the center gradient straight into ``weight.grad`` (set if None) instead of
            returning it through autograd (the head's training mode): with ``rows`` only those
            rows are written, so a step costs O(rows) once ``weight.grad`` exists (the centers'
            trainer zeroes only the touched rows after its step), and the gradient is complete
            when the backward returns (the fp16 overflow check reads it).
    """

    @classmethod
    def apply(cls, *args):
        """As ``torch.autograd.Function.apply``; the forward learns whether a graph is recorded (it
        runs with grad mode off, and ``ctx.needs_input_grad`` does not tell), so that a ``no_grad``
        call caches nothing."""
        token = _GRAD_MODE.set(torch.is_grad_enabled())
        try:
            return super().apply(*args)
        finally:
            _GRAD_MODE.reset(token)

    @staticmethod
    def forward(ctx, x_local, weight, rows, targets, margin, filter_threshold, plan, group, row_loss,
                layout, comm_stats, accumulate=False):
        sdt = stats_dtype(x_local.dtype)
        device = x_local.device
        batch = x_local.shape[0] if layout is None else sum(layout.sizes)
        num_cols = weight.shape[0] if rows is None else rows.numel()
        need_grad = _GRAD_MODE.get() and any(ctx.needs_input_grad[:2])
        q = targets.q.to(sdt) if targets.q is not None else torch.ones_like(targets.cols, dtype=sdt)
        sbytes = torch.finfo(sdt).bits // 8
        tile = plan.tile(batch, sbytes, device.type)
        direct = rows is None and (layout is None or layout.pieces == 1)   # see the backward
        capacity = plan.cache_bytes(batch, num_cols, weight.shape[1], weight.element_size(), sbytes, tile,
                                    direct) // sbytes if need_grad else 0
        borrow = BorrowedGradient.for_call(weight, direct, sdt) if need_grad and ctx.needs_input_grad[1] else None
        cache = LogitCache(capacity, sdt, device, borrow)
        spans = tiles(num_cols, tile)
        edges = [start for start, _ in spans] + [num_cols]
        sigma = margin.s * LOG2E
        xn = x_local.new_empty((batch, x_local.shape[1]))
        norms = torch.empty(batch, 1, dtype=x_local.dtype, device=device)
        scale = torch.empty(num_cols, dtype=sdt, device=device)        # sigma / |w_j|, set by piece 0
        run_lse = torch.empty(batch, dtype=sdt, device=device)         # base 2
        target_logit = torch.empty(batch, dtype=sdt, device=device)    # sum_t q_t * z_t (local part)
        label_cos = torch.zeros(batch, dtype=sdt, device=device)       # unmargined cosine of own labels
        v_buf = weight.new_empty((min(tile, num_cols), weight.shape[1]))
        work = torch.empty(0, dtype=sdt, device=device)
        timer = CommTimer()
        pieces = ([(0, x_local, torch.arange(batch, device=device))] if layout is None
                  else all_gather_pieces(x_local, layout, group, timer))
        for number, (piece, x_p, global_rows) in enumerate(pieces):
            xn_p, norms_p = normalized(x_p)
            xn[global_rows], norms[global_rows] = xn_p, norms_p
            cols_p, q_p = _target_slice(targets, q, global_rows)
            found = TileTargets(cols_p, edges)
            n = xn_p.shape[0]
            if work.numel() < n * tile:
                work = torch.empty(n * tile, dtype=sdt, device=device)
            p_lse = torch.full((n,), -math.inf, dtype=sdt, device=device)
            p_target = torch.zeros(n, dtype=sdt, device=device)
            for index, (start, stop) in enumerate(spans):
                v = scaled_rows_(weight, rows, start, stop, scale, v_buf, number == 0, sigma)
                z = cache.slot(n, start, stop)
                keep = z is not None
                z = z if keep else work[: n * (stop - start)].view(n, stop - start)
                tile_logits_(z, xn_p, v)
                hit = found.tile(index, start)
                cos_l, mask = margin_and_filter_(z, hit, margin, filter_threshold)
                if hit is not None:
                    t_rows, _, t = hit
                    label_cos[global_rows[t_rows[t == 0]]] = cos_l
                    target_logits_(p_target, z, hit, q_p)
                row_max = online_lse_(p_lse, z)                          # z is now 2^(z - row max)
                if keep:  # the backward turns these into softmax with one multiply
                    cache.keep(piece, index, z, row_max, mask)
            run_lse[global_rows], target_logit[global_rows] = p_lse, p_target
        del work, v_buf
        log2_z, target_ll, class_weight = combine_over_ranks(run_lse, target_logit, targets.class_weight_part, group)
        loss, dloss_dl = row_loss(target_ll, class_weight)
        ctx.save_for_backward(xn, norms, weight, rows, scale, log2_z, dloss_dl.to(sdt), label_cos)
        ctx.targets, ctx.q, ctx.cache, ctx.layout, ctx.group = targets, q, cache, layout, group
        ctx.margin, ctx.filter_threshold, ctx.tile, ctx.comm_stats = margin, filter_threshold, tile, comm_stats
        ctx.accumulate_into = weight if accumulate else None
        if comm_stats is not None:
            comm_stats["forward"] = timer.summary()
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xn, norms, weight, rows, scale, log2_z, dloss_dl, label_cos = ctx.saved_tensors
        margin, cache, layout = ctx.margin, ctx.cache, ctx.layout
        want_x, want_w = ctx.needs_input_grad[:2]
        sdt, device = log2_z.dtype, xn.device
        coef = grad_loss.to(sdt) * dloss_dl                      # d loss / d l_b   [B]
        # d loss / d logit = coef * (q - p); fold -coef into the exponent when it is negative everywhere.
        fold = bool((coef < 0).all())
        shift = log2_z - torch.log2(-coef) if fold else log2_z
        num_cols = weight.shape[0] if rows is None else rows.numel()
        num_pieces = 1 if layout is None else layout.pieces
        direct = rows is None and num_pieces == 1       # d w of a tile is written in place into grad_w
        grad_w, param = None, ctx.accumulate_into
        borrowed = cache.borrow.hand_over() if want_w and cache.borrow is not None else None
        if want_w and param is not None and param.grad is not None and borrowed is None:
            grad_w, direct = param.grad, False        # accumulate: add into the gradient there is
        elif want_w and param is not None and rows is not None:   # Partial FC: rows into a zero gradient
            param.grad = grad_w = torch.zeros_like(param)
        elif borrowed is not None:
            grad_w = borrowed                         # holds the cache entries until they are used
        elif want_w:
            grad_w = torch.empty_like(weight) if direct else torch.zeros_like(weight)
        spans = tiles(num_cols, ctx.tile)
        edges = [start for start, _ in spans] + [num_cols]
        width = min(ctx.tile, num_cols)
        v_buf = weight.new_empty((width, weight.shape[1]))
        tmp = weight.new_empty((width, weight.shape[1]) if want_w else (0, 0))
        h_buf = weight.new_empty((width, weight.shape[1]) if want_w else (0, 0))
        work = torch.empty(0, dtype=sdt, device=device)
        timer = CommTimer()
        scatter = None if layout is None else ReduceScatterPieces(layout, xn, ctx.group, timer)
        grad_x = None
        for piece in range(num_pieces):
            global_rows = torch.arange(xn.shape[0], device=device) if layout is None else layout.rows(piece)[1]
            xn_p, coef_p = xn.index_select(0, global_rows), coef.index_select(0, global_rows).unsqueeze(1)
            cols_p, q_p = _target_slice(ctx.targets, ctx.q, global_rows)
            found = TileTargets(cols_p, edges)
            shift_p = shift.index_select(0, global_rows).unsqueeze(1)
            log2_z_p = log2_z.index_select(0, global_rows).unsqueeze(1)
            cos_p = label_cos.index_select(0, global_rows)
            n = xn_p.shape[0]
            grad_xn_p = torch.zeros(xn_p.shape, dtype=sdt, device=device) if want_x else None
            for index, (start, stop) in enumerate(spans):
                v = scaled_rows_(weight, rows, start, stop, scale, v_buf, False, None)
                hit = found.tile(index, start)
                cached = cache.take(piece, index)   # gone after a first backward: recompute
                if cached is not None:
                    grad, mask = softmax_from_cache_(cached.exp, cached.row_max, log2_z_p, coef_p.neg()), cached.mask
                else:
                    if work.numel() < n * (stop - start):
                        work = torch.empty(n * ctx.tile, dtype=sdt, device=device)
                    grad = work[: n * (stop - start)].view(n, stop - start)
                    tile_logits_(grad, xn_p, v)
                    mask = margin_and_filter_(grad, hit, margin, ctx.filter_threshold)[1]
                    softmax_from_logits_(grad, shift_p, None if fold else coef_p.neg())
                softmax_grad_(grad, hit, coef_p, q_p, cos_p, margin, mask)
                g = grad if grad.dtype == xn.dtype else grad.to(xn.dtype)  # d loss / d logit
                if want_x and g.dtype == sdt:                               # logit = ln2 * (xn . v)
                    grad_xn_p.addmm_(g, v, alpha=LN2)
                elif want_x:
                    grad_xn_p.add_(torch.mm(g, v), alpha=LN2)
                if want_w:
                    overlaps = borrowed is not None and cache.borrow.overlaps(start, stop)  # by its own entry
                    h = grad_w[start:stop] if direct and not overlaps else h_buf[: stop - start]
                    center_grad_(torch.mm(g.t(), xn_p, out=h), v, scale[start:stop], margin.s, tmp)
                    if rows is not None:
                        grad_w.index_add_(0, rows[start:stop], h)
                    elif overlaps:
                        grad_w[start:stop] = h
                    elif not direct:
                        grad_w[start:stop] += h
            if want_x:
                grad_x_p = embedding_grad_(grad_xn_p, xn_p, norms.index_select(0, global_rows)).to(xn.dtype)
                if scatter is None:
                    grad_x = grad_x_p
                else:
                    scatter.submit(piece, grad_x_p)
        if want_x and scatter is not None:
            grad_x = scatter.finish()
        # No view of grad_w may outlive the call: autograd copies a gradient that others reference.
        cache.clear()
        if ctx.comm_stats is not None:
            ctx.comm_stats["backward"] = timer.summary()
        if param is not None:
            if grad_w is not None and grad_w is not param.grad:   # a buffer of our own: becomes or joins it
                if param.grad is None:
                    param.grad = grad_w
                else:
                    param.grad.add_(grad_w)
            grad_w = None  # in weight.grad
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None
