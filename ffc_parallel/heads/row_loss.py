"""Per-sample losses on top of the sharded softmax: how target log-likelihoods become the loss.

The fused head computes, for every sample b of the global batch, ``l_b = sum_t q_bt log p_b,t`` (the
log-probability of its label under the global softmax over all ranks' classes, or the soft-target
mixture) and ``w_y[b]``, the class weight of its label (None when the head has no class weights).
A ``RowLoss`` maps them to ``(loss, dloss_dl)``: a scalar and its derivative ``[B]`` with respect to
``l``. Both are computed identically on every rank. Every loss that depends on a sample only through
``l_b`` and ``w_y[b]`` (cross-entropy, class-weighted CE, softmax focal, ...) fits this form.
"""
from __future__ import annotations

from typing import Protocol

import torch


class RowLoss(Protocol):
    """``__call__(log_p[B], class_weight[B] or None) -> (loss scalar, dloss_dlogp[B])``."""

    def __call__(self, log_p: torch.Tensor, class_weight: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


class CrossEntropy(RowLoss):
    """``-mean_b(l_b)``; with class weights, PyTorch's weighted mean ``-sum(w_y l) / sum(w_y)``."""

    def __call__(self, log_p, class_weight):
        if class_weight is None:
            return -log_p.mean(), torch.full_like(log_p, -1.0 / log_p.numel())
        norm = class_weight.sum()
        return -(class_weight * log_p).sum() / norm, -class_weight / norm
