"""Re-weighting losses for long-tailed data on the class-sharded head.

Class weights live with the classes: rank r holds the weights of its own classes ``[num_local]``
(``head.set_class_weight``), computed here from this shard's class counts; a formula that needs a
global quantity (the rarest class, the normalising sum) costs one all-reduce of a scalar. The head
hands every sample's label weight ``w_y`` and global target log-probability ``l = log p_y`` to its
``row_loss``; the row losses below turn them into the loss:

* :class:`WeightedCrossEntropy`  ``-w_y log p_y``                  (CS_CE, CB_CE with class weights)
* :class:`SoftmaxFocal`          ``-w_y (1 - p_y)^γ log p_y``        (focal; CB_Focal with CB weights)

Reductions: ``"weighted_mean"`` divides the sum by ``Σ_b w_y[b]`` (PyTorch's ``cross_entropy(weight=)``;
equal to the plain mean without weights), ``"mean"`` by the global batch size ``B`` (the class-balanced
loss paper's code).

Sigmoid focal loss is elementwise over every logit, not a softmax: :class:`ShardedSigmoidFocal` is its
own fused, chunked pass over the head's shard (never ``[B, C]``; ``heads/sigmoid_focal.py``), with the
head's margin on the target logit and Partial FC.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..distributed.collectives import all_reduce_
from ..heads.row_loss import CrossEntropy, check_reduction, reduce_rows
from ..heads.sigmoid_focal import FocalTerms, sigmoid_focal



# ---------------------------------------------------------------------------- class weights
def shard_class_counts(labels: torch.Tensor, class_range: tuple[int, int]) -> torch.Tensor:
    """Number of samples of each class in ``class_range = (start, stop)``: int64 ``[stop - start]``.

    ``labels`` are the data set's labels (all of them, e.g. the same array on every rank); only the
    ones of this shard's classes are counted, so no rank builds a ``[C]`` vector.
    """
    start, stop = class_range
    labels = torch.as_tensor(labels).reshape(-1).long()
    mine = labels[(labels >= start) & (labels < stop)] - start
    return torch.bincount(mine, minlength=stop - start)


def _counts(local_counts) -> torch.Tensor:
    counts = torch.as_tensor(local_counts)
    if counts.dim() != 1 or counts.is_floating_point() and not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("class counts must be a 1-D tensor of non-negative numbers [num_local]")
    return counts.to(torch.float64)


def cs_weights(local_counts, gamma: float = 1.0, group=None) -> torch.Tensor:
    """Cost-sensitive weights ``w_c = (N_min / N_c)^γ`` of this shard's classes (float64 ``[num_local]``).

    ``N_min`` is the smallest non-zero count over ALL classes (one all-reduce MIN over ``group``;
    every rank of the group must call). Classes without samples get weight 0 (they never occur as a
    label, so their weight has no effect).
    """
    counts = _counts(local_counts)
    present = counts > 0
    local_min = counts[present].min() if present.any() else torch.tensor(math.inf, dtype=torch.float64)
    n_min = all_reduce_(local_min.reshape(1).clone(), dist.ReduceOp.MIN, group)
    if not torch.isfinite(n_min).all():
        raise ValueError("cs_weights: every class count is 0 on every rank")
    return torch.where(present, (n_min / counts.clamp_min(1)) ** float(gamma), torch.zeros_like(counts))


def cb_weights(local_counts, beta: float = 0.999, group=None) -> torch.Tensor:
    """Class-balanced weights ``(1 - β) / (1 - β^{n_c})`` normalised to sum to the number of classes.

    Computed per shard (float64 ``[num_local]``); the normalising sum and the class count are one
    all-reduce over ``group`` (every rank must call). Classes without samples get weight 0 and are
    left out of the normalisation (the sum equals the number of classes with samples, ``C`` when
    every class has one). ``β = 0`` gives all ones; ``β → 1`` tends to ``1 / n_c`` (normalised).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"cb_weights: beta must be in [0, 1), got {beta}")
    counts = _counts(local_counts)
    present = counts > 0
    if beta == 0.0:
        raw = present.to(torch.float64)
    else:  # (1 - β) / (1 - β^n), with 1 - β^n = -expm1(n log β) for accuracy near β = 1
        raw = (1.0 - beta) / (-torch.expm1(counts.clamp_min(1) * math.log(beta)))
        raw = torch.where(present, raw, torch.zeros_like(raw))
    sums = all_reduce_(torch.stack([raw.sum(), present.sum().to(torch.float64)]), dist.ReduceOp.SUM, group)
    if sums[1] == 0:
        raise ValueError("cb_weights: every class count is 0 on every rank")
    return raw * (sums[1] / sums[0])


# ---------------------------------------------------------------------------- row losses
WeightedCrossEntropy = CrossEntropy   # CS_CE / CB_CE: the head's cross-entropy with class weights


class SoftmaxFocal:
    """Row loss ``Σ_b w_y[b] · (-(1 - p_b)^γ log p_b) / norm`` with ``p_b = exp(log_p[b])``.

    Softmax focal loss (γ = 2 default; γ = 0 is cross-entropy); with class-balanced weights on the
    head it is CB_Focal. Derivative with respect to ``l = log p``:
    ``-(1 - p)^γ + γ (1 - p)^{γ-1} p l`` (finite for every γ >= 0: the second term vanishes as p → 1).
    With soft targets the head passes ``l = Σ_t q_t log p_t``; then ``p = exp(l)``.
    """

    def __init__(self, gamma: float = 2.0, reduction: str = "weighted_mean"):
        if not gamma >= 0:
            raise ValueError(f"SoftmaxFocal: gamma must be >= 0, got {gamma}")
        self.gamma, self.reduction = float(gamma), check_reduction(reduction)

    def __call__(self, log_p, class_weight):
        g = self.gamma
        p = torch.exp(log_p)
        one_minus_p = (-torch.expm1(log_p)).clamp_min(0.0)
        per_sample = -(one_minus_p ** g) * log_p
        d_per_sample = -(one_minus_p ** g)
        if g > 0:
            tiny = torch.finfo(log_p.dtype).tiny
            d_per_sample = d_per_sample + g * one_minus_p.clamp_min(tiny) ** (g - 1.0) * p * log_p
        loss, coef = reduce_rows(per_sample, class_weight, self.reduction)
        return loss, coef * d_per_sample

    def __repr__(self):
        return f"SoftmaxFocal(gamma={self.gamma}, reduction={self.reduction!r})"


# ---------------------------------------------------------------------------- the re-weighting methods
# method -> (row loss, class weights): the one table of the re-weightings (ffc-train's --reweight too).
# "sigmoid_focal" is not a row loss of the softmax but a loss of its own on the head (ShardedSigmoidFocal).
_METHODS = {"ce": ("ce", None), "cs_ce": ("ce", "cs"), "cb_ce": ("ce", "cb"), "focal": ("focal", None),
            "cb_focal": ("focal", "cb"), "sigmoid_focal": (None, None)}
REWEIGHTING = tuple(_METHODS)


def _method(method: str):
    if method not in _METHODS:
        raise ValueError(f"unknown re-weighting {method!r}: use one of {REWEIGHTING}")
    return _METHODS[method]


def row_loss_for(method: str, focal_gamma: float = 2.0, reduction: str = "weighted_mean"):
    """The head's ``row_loss`` for ``method`` (pass it as ``ShardedClassifier(..., row_loss=...)``);
    None for ``"sigmoid_focal"``, which replaces the softmax (:class:`ShardedSigmoidFocal`)."""
    loss = _method(method)[0]
    if loss is None:
        return None
    return SoftmaxFocal(focal_gamma, reduction) if loss == "focal" else WeightedCrossEntropy(reduction)


def class_weights_for(method: str, local_counts=None, *, num_local: int, gamma: float = 1.0, beta: float = 0.999,
                      group=None):
    """This rank's class weights ``[num_local]`` for ``method`` (None for the unweighted ones), from its
    class counts (:func:`shard_class_counts`). Weighted methods all-reduce over ``group``: every rank calls."""
    kind = _method(method)[1]
    if kind is None:
        return None
    if local_counts is None:
        raise ValueError(f"re-weighting {method!r} needs this rank's class counts (shard_class_counts)")
    counts = torch.as_tensor(local_counts)
    if counts.shape != (num_local,):
        raise ValueError(f"class counts must have shape [num_local] = [{num_local}], got {tuple(counts.shape)}")
    return cs_weights(counts, gamma, group) if kind == "cs" else cb_weights(counts, beta, group)


def configure_reweighting(head, method: str, local_counts=None, *, gamma: float = 1.0, beta: float = 0.999,
                          focal_gamma: float = 2.0, reduction: str = "weighted_mean") -> None:
    """One call for a built head: its row loss (:func:`row_loss_for`) and class weights
    (:func:`class_weights_for`) for one of :data:`REWEIGHTING` but ``"sigmoid_focal"``.

    ``"ce"``: plain cross-entropy, no weights; ``"cs_ce"``: CE with ``cs_weights(counts, gamma)``;
    ``"cb_ce"``: CE with ``cb_weights(counts, beta)``; ``"focal"``: softmax focal (``focal_gamma``),
    no weights; ``"cb_focal"``: softmax focal with CB weights. ``local_counts[num_local]`` are this
    rank's class counts; weighted methods all-reduce over ``head.group``, so every rank must call.
    """
    row_loss = row_loss_for(method, focal_gamma, reduction)
    if row_loss is None:
        raise ValueError("re-weighting 'sigmoid_focal' is a loss of its own: call "
                         "fp.losses.ShardedSigmoidFocal(...)(head, embeddings, labels) instead of the head")
    weights = class_weights_for(method, local_counts, num_local=head.num_local, gamma=gamma, beta=beta,
                                group=head.group)
    head.set_row_loss(row_loss)
    head.set_class_weight(weights)


class DeferredReweighting:
    """DRW: train with ``before`` class weights (None = unweighted) until ``switch_epoch``, then ``after``.

    ``apply(head, epoch)`` sets the head's weights for that epoch (call it at the start of every
    epoch; it is idempotent and works when resuming mid-schedule). ``after`` is this rank's
    ``[num_local]`` weights, e.g. ``cb_weights(counts, 0.9999)``.
    """

    def __init__(self, switch_epoch: int, after: torch.Tensor, before: torch.Tensor | None = None):
        if switch_epoch < 0:
            raise ValueError(f"switch_epoch must be >= 0, got {switch_epoch}")
        self.switch_epoch, self.after, self.before = int(switch_epoch), after, before

    def weights(self, epoch: int):
        return self.after if epoch >= self.switch_epoch else self.before

    def apply(self, head, epoch: int) -> None:
        head.set_class_weight(self.weights(epoch))


# ---------------------------------------------------------------------------- sigmoid focal
class ShardedSigmoidFocal:
    """Sigmoid focal loss over every class of a :class:`~ffc_parallel.ShardedClassifier`.

    ``loss = Σ_b w_y[b] Σ_j -α_t (1 - q_bj)^γ log q_bj / norm`` where ``q = σ(z)`` for the label and
    ``σ(-z)`` for every other class, ``z`` the head's logits (scaled cosines, the head's margin on the
    label, its interclass filter), ``α_t = α`` on the label and ``1 - α`` elsewhere (``alpha=None``:
    no α balancing), ``w_y`` the head's class weights (1 without), ``norm = Σ_b w_y[b]``
    (``"weighted_mean"``) or ``B`` (``"mean"``). With Partial FC the sum runs over the sampled classes.
    ``prior=π`` adds the fixed offset ``log(π / (1 - π))`` to every logit (after the filter), RetinaNet's
    prior: every class starts at probability about π instead of 1/2, which keeps the C - 1 negative
    terms from swamping the positive one early in training (cosine logits have no bias to learn it).

    ``loss = ShardedSigmoidFocal(gamma=2)(head, local_embeddings[b, D], local_labels[b])`` is a scalar,
    identical on every rank of ``head.group``; gradients follow the head's semantics (exact gradient
    of that loss for this rank's embeddings and own class rows). The fused kernel is
    ``heads/sigmoid_focal.py``, walking the shard like the head (gather pieces, center gradients into
    ``weight.grad`` in training mode): memory about six ``[B, chunk]`` buffers with half the head's
    chunk; the logits are recomputed in the backward (four matrix products in all), one all-reduce of
    ``[B, 2]`` numbers.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, reduction: str = "weighted_mean",
                 prior: float | None = None):
        if not gamma >= 0:
            raise ValueError(f"ShardedSigmoidFocal: gamma must be >= 0, got {gamma}")
        if prior is not None and not 0.0 < prior < 1.0:
            raise ValueError(f"ShardedSigmoidFocal: prior must be in (0, 1) or None, got {prior}")
        self.prior = prior
        self.offset = math.log(prior / (1.0 - prior)) if prior is not None else 0.0
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"ShardedSigmoidFocal: alpha must be in [0, 1] or None, got {alpha}")
        self.gamma, self.alpha, self.reduction = float(gamma), alpha, check_reduction(reduction)

    def __call__(self, head, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        step = head.prepare_step(local_embeddings, local_labels)
        # The kernel hands each sample l = -(sum of its focal terms) to the row loss: -w_y l / norm.
        return sigmoid_focal(head.weight, step, FocalTerms(self.gamma, self.alpha, self.offset),
                             WeightedCrossEntropy(self.reduction), head.chunk_size)

    def __repr__(self):
        return (f"ShardedSigmoidFocal(gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"prior={self.prior})")
