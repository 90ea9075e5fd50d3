"""Fused, chunked sigmoid focal loss over the head's class-sharded centers (never ``[B, C]``).

Elementwise over every logit, not a softmax. For sample ``b`` and used class ``j``, with the head's
logit ``z_bj`` (scaled cosine, the margin on the label, the interclass filter, plus a fixed
``offset``), ``z' = z`` on the label and ``-z`` elsewhere, ``q = sigmoid(z')``:

    focal_bj = -α_t (1 - q)^γ log q,        d focal_bj / d z' = α_t (1 - q)^γ (γ q log q - (1 - q))

(``α_t = α`` on the label, ``1 - α`` elsewhere, 1 without α). Each sample's ``l_b = -sum_j focal_bj``
over every rank's classes (one all-reduce of ``[B, 2]`` with the label-weight parts) goes to the
row loss, which weights and reduces it. The walk is the softmax's (``walk.py``: gather pieces,
tiles, margin and filter, gradients through the normalisations, center gradients into
``weight.grad``); the logits are recomputed in the backward (four matrix products in all). Tiles
are the plan's chunks: the focal terms hold about six ``[B, chunk]`` buffers, twice the softmax's
three, so the head's own plan is halved unless ``chunk_size`` was set.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .chunking import ChunkPlan
from .stages import LN2, margin_grad_, sum_rows_over_ranks
from .walk import LossOptions, Step, Targets, TileWalk


@dataclass(frozen=True)
class FocalTerms:
    """The per-logit focal terms of a tile: ``gamma``, ``alpha`` (None: no α balancing) and the
    ``offset`` added to every logit (after the filter). Each method takes the tile's base-2 logits
    ``z[n, k]`` (margin and filter applied; overwritten) and its label entries ``hit``."""

    gamma: float
    alpha: float | None
    offset: float

    def loss(self, z, hit):
        """``focal[n, k]``."""
        zt, _, alpha_t = self._signed(z, hit)
        log_q = F.logsigmoid(zt)
        mod = torch.sigmoid(-zt) ** self.gamma if self.gamma else torch.ones_like(zt)
        loss = -mod * log_q
        return loss if alpha_t is None else loss * alpha_t

    def grad(self, z, hit):
        """``d focal / d logit [n, k]``."""
        zt, sign, alpha_t = self._signed(z, hit)
        log_q, q, one_minus_q = F.logsigmoid(zt), torch.sigmoid(zt), torch.sigmoid(-zt)
        mod = one_minus_q ** self.gamma if self.gamma else torch.ones_like(zt)
        grad = mod * (self.gamma * q * log_q - one_minus_q) * sign
        return grad if alpha_t is None else grad * alpha_t

    def _signed(self, z, hit):
        """``(z' = sign * logit, sign, α_t or None)``, each ``[n, k]``; ``sign`` is +1 on the labels."""
        sign = torch.full_like(z, -1.0)
        if hit is not None:
            sign[hit[0], hit[1]] = 1.0
        logit = z.mul_(LN2).add_(self.offset) if self.offset else z.mul_(LN2)
        alpha_t = None
        if self.alpha is not None:
            alpha_t = torch.full_like(z, 1.0 - self.alpha).masked_fill_(sign > 0, self.alpha)
        return logit.mul_(sign), sign, alpha_t


class ShardedSigmoidFocalFn(torch.autograd.Function):
    """``loss = row_loss(-sum_j focal[B, j] over every rank's used classes, w_y)``: see the module
    docstring. ``apply(x_local[b, D], weight[num_local, D], rows, targets, options, terms)`` as
    :class:`~ffc_parallel.heads.softmax_ce.ShardedMarginSoftmaxCE` (targets: the labels alone), with
    :class:`FocalTerms`."""

    @staticmethod
    def forward(ctx, x_local, weight, rows, targets: Targets, options: LossOptions, terms: FocalTerms):
        walk = TileWalk.start(x_local, weight, rows, targets, options, width=options.plan.chunk)
        focal = torch.empty(walk.batch, dtype=walk.sdt, device=x_local.device)   # sum_j focal_bj, local classes
        for piece in walk.gather(x_local):
            p_focal = torch.zeros(piece.n, dtype=walk.sdt, device=x_local.device)
            for tile in walk.tiles(piece):
                z = walk.work(piece, tile)
                walk.logits(z, piece, tile)
                p_focal += terms.loss(z, tile.hit).sum(dim=1)
            focal[piece.rows] = p_focal
        summed, class_weight = sum_rows_over_ranks([focal], targets.class_weight_part, options.group)
        loss, dloss_dl = options.row_loss(-summed[:, 0], class_weight)
        ctx.save_for_backward(walk.xn, walk.norms, weight, rows, walk.scale, dloss_dl.to(walk.sdt))
        ctx.targets, ctx.options, ctx.terms = targets, options, terms
        walk.report("forward")
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        xn, norms, weight, rows, scale, dloss_dl = ctx.saved_tensors
        options, (want_x, want_w) = ctx.options, ctx.needs_input_grad[:2]
        walk = TileWalk(weight, rows, ctx.targets, options, xn, norms, scale, width=options.plan.chunk)
        coef = -(grad_loss.to(dloss_dl.dtype) * dloss_dl)             # d loss / d sum_j focal_bj   [B]
        center = walk.center_gradient() if want_w else None
        for piece in walk.pieces_again(want_x):
            coef_p = coef.index_select(0, piece.rows).unsqueeze(1)
            for tile in walk.tiles(piece):
                z = walk.work(piece, tile)
                label_cos, mask = walk.logits(z, piece, tile)
                grad = ctx.terms.grad(z, tile.hit).mul_(coef_p)                # d loss / d logit
                walk.add_grads(piece, tile, margin_grad_(grad, tile.hit, label_cos, options.margin, mask), center)
            walk.send_embedding_grad(piece)
        walk.report("backward")
        return walk.embedding_grad(), center.finish() if center is not None else None, None, None, None, None


def sigmoid_focal(weight, step: Step, terms: FocalTerms, row_loss, chunk_size: int | None) -> torch.Tensor:
    """The loss of one call on the head's centers ``weight`` (``step``: ``head.prepare_step(...)``;
    ``chunk_size``: the head's, None to halve its plan's chunk); nothing is cached."""
    plan = step.options.plan if chunk_size is not None else ChunkPlan(max(1, step.options.plan.chunk // 2), 0)
    options = replace(step.options, plan=plan, row_loss=row_loss)
    return ShardedSigmoidFocalFn.apply(step.x, weight, step.rows, step.targets, options, terms)
