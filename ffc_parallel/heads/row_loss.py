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


REDUCTIONS = ("weighted_mean", "mean")   # the one reduction family of every row loss


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_rows(per_sample: torch.Tensor, weight: torch.Tensor | None, reduction: str):
    """``(loss, d loss / d per_sample [B])`` of ``Σ_b w_b per_sample_b / norm``: ``norm = Σ_b w_b``
    (``"weighted_mean"``, PyTorch's ``cross_entropy(weight=)``; the plain mean without weights) or the
    global batch size ``B`` (``"mean"``). ``weight`` None: all ones."""
    batch = per_sample.numel()
    w = torch.ones_like(per_sample) if weight is None else weight.to(per_sample.dtype)
    norm = w.sum() if reduction == "weighted_mean" else torch.tensor(float(batch), dtype=per_sample.dtype)
    if not norm > 0:
        raise ValueError("the class weights of every label in the global batch are 0: the weighted mean "
                         "is undefined (give those classes a positive weight or use reduction='mean')")
    return (w * per_sample).sum() / norm, w / norm


class CrossEntropy(RowLoss):
    """``Σ_b w_y[b] (-l_b) / norm`` (:func:`reduce_rows`): ``-mean(l)`` without class weights; with them
    PyTorch's weighted mean (``"weighted_mean"``) or the class-balanced paper's ``/ B`` (``"mean"``)."""

    def __init__(self, reduction: str = "weighted_mean"):
        self.reduction = check_reduction(reduction)

    def __call__(self, log_p, class_weight):
        loss, coef = reduce_rows(-log_p, class_weight, self.reduction)
        return loss, -coef

    def __repr__(self):
        return f"CrossEntropy(reduction={self.reduction!r})"
