"""The math of the chunked losses, one named stage per function (the paths only call these).

Shapes: ``B`` rows of the global batch (``n`` of them in a gather piece), ``D`` the embedding dim,
``k`` classes in a tile. ``xn[n, D]`` are the normalised embeddings, ``v[k, D] = sigma w / |w|`` the
tile's scaled rows with ``sigma = s log2(e)``, so that ``z = xn v^T`` are logits in base-2 units
(``logit = ln 2 * z = s cos``; ``exp2`` is cheaper than ``exp`` on CPU). Gradients ``G[n, k]`` are
``d loss / d logit``. Statistics and elementwise work are in the stats dtype (fp32 at least);
functions ending in ``_`` write into their first argument.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..distributed.collectives import all_reduce_
from .margins import CombinedMargin

LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)


# ---------------------------------------------------------------------------- forward
def normalized(x: torch.Tensor):
    """``(xn[n, D], norms[n, 1])``: the rows of ``x[n, D]`` over their norms (floored at 1e-12)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
    return x / norms, norms


def scaled_rows_(weight, rows, start, stop, scale, out, fresh, sigma, wide=None):
    """``v[k, D] = scale * w_c`` written into ``out[:k]`` (rows ``start:stop`` of ``weight``, or of
    ``weight[rows]``). With ``fresh``, first sets ``scale[start:stop] = sigma / |w_c|``, the norms
    taken in the stats dtype: for half rows through ``wide`` (a ``[>= k, D]`` buffer of it) when given,
    which is what ``vector_norm(dtype=)`` would allocate."""
    v = out[: stop - start]
    src = weight[start:stop] if rows is None else torch.index_select(weight, 0, rows[start:stop], out=v)
    a = scale[start:stop]
    if fresh:
        if wide is not None:
            torch.linalg.vector_norm(wide[: stop - start].copy_(src), dim=1, out=a)
        else:
            torch.linalg.vector_norm(src, dim=1, dtype=a.dtype, out=a)
        a.clamp_min_(1e-12).reciprocal_().mul_(sigma)
    torch.mul(src, a.unsqueeze(1).to(src.dtype), out=v)
    return v


def tile_logits_(out, xn, v, narrow=None):
    """``out[n, k] = xn[n, D] @ v[k, D].T``: the tile's base-2 logits (``out`` in the stats dtype; for
    half ``xn`` the product goes through ``narrow``, an ``[n, k]`` buffer of ``xn``'s dtype, when given)."""
    if out.dtype == xn.dtype:
        torch.mm(xn, v.t(), out=out)
    else:
        out.copy_(torch.mm(xn, v.t()) if narrow is None else torch.mm(xn, v.t(), out=narrow))


def margin_and_filter_(z, hit, margin: CombinedMargin, filter_threshold):
    """In place on base-2 logits ``z[n, k]``: the margin on the label entries of ``hit = (rows, cols,
    t)`` (``t == 0``; None: no target in the tile), 0 for non-target entries above ``s *
    filter_threshold`` (insightface's interclass filtering). Returns ``(label_cos, mask)``: the labels'
    unmargined cosines (in the order of the label entries of ``hit``; None without targets) and the
    filtered entries ``[n, k]`` (or None)."""
    sigma = margin.s * LOG2E
    mask = None
    if filter_threshold is not None:
        mask = z > sigma * filter_threshold
        if hit is not None:
            mask[hit[0], hit[1]] = False
        z.masked_fill_(mask, 0.0)
    if hit is None:
        return None, mask
    rows, cols, t = hit
    label = t == 0
    l_rows, l_cols = rows[label], cols[label]
    label_cos = (z[l_rows, l_cols] / sigma).clamp_(-1.0, 1.0)
    z[l_rows, l_cols] = sigma * margin.target(label_cos)
    return label_cos, mask


def target_logits_(acc, z, hit, q):
    """``acc[n] += sum_t q[row, t] * z[row, col]`` over the target entries ``hit`` of the tile (base 2)."""
    rows, cols, t = hit
    acc.index_add_(0, rows, q[rows, t] * z[rows, cols])


def online_lse_(lse, z):
    """Online log-sum-exp (base 2) of a tile: ``lse[n] = log2(2^lse + sum_j 2^z[:, j])``; ``z[n, k]``
    becomes ``2^(z - row max)`` in place. Returns the row max ``[n, 1]``."""
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max).exp2_()
    torch.logaddexp2(lse, row_max.squeeze(1) + z.sum(dim=1).log2_(), out=lse)
    return row_max


def sum_rows_over_ranks(parts, weight_part, group):
    """Rows summed over the ranks of ``group`` in one all-reduce: ``(summed[B, len(parts)], w_y[B])``
    of the ``[B]`` statistics ``parts`` and of the label-weight parts (``w_y`` None without them)."""
    if weight_part is not None:
        parts = parts + [weight_part.to(parts[0].dtype)]
    summed = all_reduce_(torch.stack(parts, dim=1), dist.ReduceOp.SUM, group)
    return summed, (summed[:, -1] if weight_part is not None else None)


def combine_over_ranks(run_lse, target_logit, weight_part, group):
    """The softmax's row statistics over every rank's classes: ``(log2 Z[B], l[B], w_y[B] or None)``
    from this rank's base-2 log-sum-exp ``run_lse[B]`` and target logits ``target_logit[B]`` (base 2,
    scaled in place to natural units). ``l = sum_t q_t logit_t - ln Z`` is each sample's target
    log-likelihood. Two all-reduces: MAX of ``run_lse``, SUM of the rescaled sums stacked with the
    target logits and the label-weight parts."""
    global_max = all_reduce_(run_lse.clone(), dist.ReduceOp.MAX, group)
    # A rank without classes has run_lse = -inf: it contributes 2^(-inf) = 0.
    summed, class_weight = sum_rows_over_ranks([torch.exp2(run_lse - global_max), target_logit.mul_(LN2)],
                                          weight_part, group)
    log2_z = global_max + torch.log2(summed[:, 0])
    return log2_z, summed[:, 1] - log2_z * LN2, class_weight


# ---------------------------------------------------------------------------- backward
def softmax_from_cache_(e, row_max, log2_z, neg_coef):
    """``-coef * p[n, k]`` in place from a cached ``e = 2^(z - row max)`` (``row_max[n, 1]``,
    ``log2_z[n, 1]``, ``neg_coef[n, 1] = -d loss / d l``)."""
    return e.mul_(torch.exp2(row_max - log2_z).mul_(neg_coef))


def softmax_from_logits_(z, shift, neg_coef):
    """``-coef * p[n, k]`` in place from base-2 logits ``z`` (margin and filter applied):
    ``2^(z - shift)``, times ``neg_coef[n, 1]`` unless it was folded into ``shift[n, 1]`` (None)."""
    z.sub_(shift).exp2_()
    return z if neg_coef is None else z.mul_(neg_coef)


def softmax_grad_(grad, hit, coef, q, label_cos, margin: CombinedMargin, mask):
    """The softmax gradient of a tile, in place: ``grad[n, k]`` holds ``-coef * p`` and becomes
    ``d loss / d logit = coef * (q - p)`` (``coef[n, 1]``, target probabilities ``q[n, T]`` at the
    entries ``hit``), then goes through the margin and the filter (:func:`margin_grad_`, with the
    labels' cosines ``label_cos[n]`` by row)."""
    hit_cos = None
    if hit is not None:
        rows, cols, t = hit
        grad.index_put_((rows, cols), coef[rows, 0] * q[rows, t], accumulate=True)
        hit_cos = label_cos[rows[t == 0]]
    return margin_grad_(grad, hit, hit_cos, margin, mask)


def margin_grad_(grad, hit, label_cos, margin: CombinedMargin, mask):
    """Through the margin and the filter, in place on ``grad[n, k] = d loss / d logit``: label
    entries of ``hit`` times ``f'(cos)`` (the label's logit is ``s f(cos)``; ``label_cos`` in the
    order of those entries), filtered entries (``mask``, or None) 0."""
    if hit is not None:
        rows, cols, t = hit
        label = t == 0
        grad[rows[label], cols[label]] *= margin.target_grad(label_cos)
    if mask is not None:
        grad.masked_fill_(mask, 0.0)
    return grad


def center_grad_(h, v, scale, s, tmp, wide=None):
    """Center gradient through the normalisation, in place: ``h[k, D] = G^T xn`` (``d loss / d v``
    up to the factor ln 2) becomes ``d loss / d w_c = (s / |w|) (h - v (v . h) / sigma^2)``, with
    ``v = sigma w / |w|`` and ``scale[k] = sigma / |w|``; ``tmp`` is a ``[>= k, D]`` buffer of ``h``'s
    dtype, ``wide`` (optional, for half ``h``) one of the stats dtype that ``h * v`` is summed in."""
    sigma = s * LOG2E
    k = h.shape[0]
    prod = torch.mul(h, v, out=tmp[:k])
    if wide is not None:
        prod = wide[:k].copy_(prod)
    radial = prod.sum(dim=1, dtype=scale.dtype)
    a = scale * LN2                                                 # s / |w|
    h.mul_(a.unsqueeze(1).to(h.dtype))
    h.addcmul_(v, radial.mul_(a).div_(sigma * sigma).unsqueeze(1).to(h.dtype), value=-1.0)
    return h


def embedding_grad_(grad_xn, xn, norms):
    """Embedding gradient through the normalisation, in place: ``grad_xn[n, D] = d loss / d xn``
    becomes ``d loss / d x = (I - xn xn^T) grad_xn / |x|`` (``norms[n, 1]``)."""
    grad_xn.sub_(xn * (grad_xn * xn).sum(dim=1, keepdim=True))
    return grad_xn.div_(norms)
