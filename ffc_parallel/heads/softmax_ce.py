"""Fused, chunked, distributed margin-softmax cross-entropy over a class-sharded weight.

Each rank holds the rows ``weight[num_local, D]`` of its classes and its local embeddings
``x[b, D]``; the function gathers the global batch (``B`` rows, rank-major) and normalises it. The
loss is

    loss = mean_b( logsumexp_over_all_ranks(logits[b, :]) - logits[b, y_b] ),
    logits[b, j] = s * cos(x_b, w_j)   (target: s * f(cos), see margins.py)

computed tile by tile over the local classes, never materialising ``[B, num_local]``:

* gather: the global batch arrives in ``pieces`` asynchronous all-gathers, all issued at once; the
  classes are walked for piece p while pieces p+1.. are still in flight (``walk.py``).
* forward: per tile one GEMM ``xn @ v_c.T`` with ``v_c = s log2(e) w_c / |w_c|`` gives the logits in
  base-2 units (``exp2`` is cheaper than ``exp`` on CPU); an online log-sum-exp per row is combined
  across ranks by two all-reduces (MAX of the row log-sum-exp, SUM of the rescaled sums stacked with
  the target logit). ``s log2(e) / |w|`` is computed once and kept for the backward.
* backward: per tile ``G = d loss / d logit`` (softmax minus targets, margin derivative on the
  label), then ``d xn += G @ v_c`` and ``d v_c = G.T @ xn`` mapped to ``d w_c`` through the
  normalisation (an ``[n, D]`` operation). ``exp2(logit - row max)`` of the leading tiles that fit
  the cache part of the memory budget is kept from the forward (the softmax is then one multiply,
  ``logit_cache.py``); the others are recomputed (one extra GEMM for those tiles only). With the
  default budget, small shards keep everything and run exactly three matrix products. The backward
  walks the pieces in order and reduce-scatters each piece's embedding gradient (summed over ranks,
  since every rank holds a part of every sample's softmax) while the next piece is computed. With
  more than one piece the center gradient is accumulated once per piece.

Memory: the :class:`ChunkPlan` (from the budget) fixes how many logits may be cached. The compute
tile is the plan's chunk on accelerators; on CPU it is capped at ``CPU_TILE_BYTES`` per ``[B, tile]``
buffer so that the elementwise passes after each GEMM run in the last-level cache. All work buffers
(one ``[B, tile]``, up to three ``[tile, D]``) are allocated once per call and reused.

Where the parts live: ``chunking.py`` (plan, tiles, targets by tile), ``stages.py`` (the math, one
function per stage), ``walk.py`` (pieces, tiles and gradient writing, shared with
``sigmoid_focal.py``), ``logit_cache.py`` and, for the CPU cache inside the center-gradient buffer,
``borrowed_grad.py``.
"""
from __future__ import annotations

import math

import torch

from .borrowed_grad import borrowed_columns, borrows_gradient
from .chunking import DEFAULT_MEMORY_BUDGET_MB, ChunkPlan, chunk_cosines, chunk_rows, stats_dtype
from .logit_cache import LogitCache
from .stages import (combine_over_ranks, online_lse_, softmax_from_cache_, softmax_from_logits_, softmax_grad_,
                     target_logits_)
from .walk import LossOptions, Targets, TileWalk

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "ChunkPlan", "LossOptions", "ShardedMarginSoftmaxCE", "Targets",
           "borrowed_columns", "borrows_gradient", "chunk_cosines", "chunk_rows", "stats_dtype"]


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """``loss = f(x_local[b, D], weight[num_local, D])``; see the module docstring.

    With target probabilities ``q`` (soft targets) each sample's target log-likelihood is
    ``l_b = sum_t q_bt * log p_b,t`` over the global softmax; ``row_loss(l[B], w_y[B])`` turns it into
    the loss and its derivative ``dloss/dl`` (default: ``-mean(l)``), so that
    ``d loss / d logit_bj = dloss/dl_b * (q_bj - p_bj)``.

    ``apply(x_local, weight, rows, targets, options)``: ``rows[S]`` sorted local row indices to use
    (Partial FC) or None for all rows; ``targets`` a :class:`Targets` for the global (rank-major)
    batch; ``options`` a :class:`LossOptions` (no gradient).
    """

    @staticmethod
    def forward(ctx, x_local, weight, rows, targets: Targets, options: LossOptions):
        walk = TileWalk.start(x_local, weight, rows, targets, options)
        cache = LogitCache.for_call(walk, weight, options.record, ctx.needs_input_grad[1])
        sdt, device = walk.sdt, x_local.device
        q = targets.q.to(sdt) if targets.q is not None else torch.ones_like(targets.cols, dtype=sdt)
        run_lse = torch.empty(walk.batch, dtype=sdt, device=device)        # base 2
        target_logit = torch.empty(walk.batch, dtype=sdt, device=device)   # sum_t q_t * z_t (local part)
        label_cos = torch.zeros(walk.batch, dtype=sdt, device=device)      # unmargined cosine of own labels
        for piece in walk.gather(x_local):
            n, q_p = piece.n, q.index_select(0, piece.rows)
            p_lse = torch.full((n,), -math.inf, dtype=sdt, device=device)
            p_target = torch.zeros(n, dtype=sdt, device=device)
            for tile in walk.tiles(piece):
                z = cache.slot(n, tile.start, tile.stop)
                keep = z is not None
                z = z if keep else walk.work(piece, tile)
                cos_l, mask = walk.logits(z, piece, tile)
                if tile.hit is not None:
                    t_rows, _, t = tile.hit
                    label_cos[piece.rows[t_rows[t == 0]]] = cos_l
                    target_logits_(p_target, z, tile.hit, q_p)
                row_max = online_lse_(p_lse, z)                                # z is now 2^(z - row max)
                if keep:  # the backward turns these into softmax with one multiply
                    cache.keep(piece.number, tile.index, z, row_max, mask)
            run_lse[piece.rows], target_logit[piece.rows] = p_lse, p_target
        log2_z, target_ll, class_weight = combine_over_ranks(run_lse, target_logit, targets.class_weight_part,
                                                             options.group)
        loss, dloss_dl = options.row_loss(target_ll, class_weight)
        ctx.save_for_backward(walk.xn, walk.norms, weight, rows, walk.scale, log2_z, dloss_dl.to(sdt), label_cos)
        ctx.targets, ctx.q, ctx.cache, ctx.options = targets, q, cache, options
        walk.report("forward")
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xn, norms, weight, rows, scale, log2_z, dloss_dl, label_cos = ctx.saved_tensors
        options, cache, (want_x, want_w) = ctx.options, ctx.cache, ctx.needs_input_grad[:2]
        walk = TileWalk(weight, rows, ctx.targets, options, xn, norms, scale)
        coef = grad_loss.to(log2_z.dtype) * dloss_dl                    # d loss / d l_b   [B]
        # d loss / d logit = coef * (q - p); fold -coef into the exponent when it is negative everywhere.
        fold = bool((coef < 0).all())
        shift = log2_z - torch.log2(-coef) if fold else log2_z
        center = walk.center_gradient(cache.borrow) if want_w else None
        for piece in walk.pieces_again(want_x):
            coef_p, shift_p, log2_z_p = (t.index_select(0, piece.rows).unsqueeze(1) for t in (coef, shift, log2_z))
            q_p, cos_p = ctx.q.index_select(0, piece.rows), label_cos.index_select(0, piece.rows)
            for tile in walk.tiles(piece):
                cached = cache.take(piece.number, tile.index)   # gone after a first backward: recompute
                if cached is not None:
                    grad, mask = softmax_from_cache_(cached.exp, cached.row_max, log2_z_p, coef_p.neg()), cached.mask
                else:
                    grad = walk.work(piece, tile)
                    mask = walk.logits(grad, piece, tile)[1]
                    softmax_from_logits_(grad, shift_p, None if fold else coef_p.neg())
                softmax_grad_(grad, tile.hit, coef_p, q_p, cos_p, options.margin, mask)
                walk.add_grads(piece, tile, grad, center)
            walk.send_embedding_grad(piece)
        cache.clear()
        walk.report("backward")
        return walk.embedding_grad(), center.finish() if center is not None else None, None, None, None
