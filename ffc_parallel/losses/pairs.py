"""Pair-based metric-learning losses on a similarity matrix, per anchor.

Each loss maps ``sim[b, M]`` (cosine similarities of ``b`` anchors to ``M`` references),
``same[b, M]`` (the pair shares a label) and ``valid[b, M]`` (the pair may be used: False for an
anchor paired with itself, for empty memory slots) to the per-anchor losses ``[b]``. The caller
sums them and divides by the number of anchors (see :class:`~ffc_parallel.losses.CrossBatchMemory`).
"""
from __future__ import annotations

import torch


class ContrastiveLoss:
    """``Σ_{j pos} (1 - s_ij) + Σ_{j neg} [s_ij - margin]_+`` per anchor i (XBM's contrastive loss;
    margin 0.5 by default)."""

    def __init__(self, margin: float = 0.5):
        self.margin = float(margin)

    def __call__(self, sim: torch.Tensor, same: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pos = same & valid
        neg = ~same & valid
        zero = sim.new_zeros(())
        pos_loss = torch.where(pos, 1.0 - sim, zero).sum(dim=1)
        neg_loss = torch.where(neg, (sim - self.margin).clamp_min(0.0), zero).sum(dim=1)
        return pos_loss + neg_loss

    def __repr__(self):
        return f"ContrastiveLoss(margin={self.margin})"


class MultiSimilarityLoss:
    """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, per anchor i:

    keep negatives with ``s_ik + ε > min_pos s_ij`` and positives with ``s_ij - ε < max_neg s_ik``, then
    ``(1/α) log(1 + Σ_pos e^{-α (s - λ)}) + (1/β) log(1 + Σ_neg e^{β (s - λ)})``. An anchor without a
    positive or a negative (before or after mining) contributes 0. Defaults ``α=2, β=50, λ=0.5, ε=0.1``.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        self.alpha, self.beta, self.base, self.epsilon = float(alpha), float(beta), float(base), float(epsilon)

    def __call__(self, sim: torch.Tensor, same: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pos, neg = same & valid, ~same & valid
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        hardest_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True).detach()
        hardest_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True).detach()
        pos = pos & (sim - self.epsilon < hardest_neg)
        neg = neg & (sim + self.epsilon > hardest_pos)
        active = pos.any(dim=1) & neg.any(dim=1)
        pos_loss = self._log1p_sum_exp(torch.where(pos, -self.alpha * (sim - self.base), -inf)) / self.alpha
        neg_loss = self._log1p_sum_exp(torch.where(neg, self.beta * (sim - self.base), -inf)) / self.beta
        return torch.where(active, pos_loss + neg_loss, sim.new_zeros(()))

    @staticmethod
    def _log1p_sum_exp(a: torch.Tensor) -> torch.Tensor:
        """``log(1 + Σ_j e^{a_j})`` per row, stable (``-inf`` entries count as absent)."""
        return torch.logsumexp(torch.cat([a.new_zeros(a.shape[0], 1), a], dim=1), dim=1)

    def __repr__(self):
        return (f"MultiSimilarityLoss(alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"epsilon={self.epsilon})")


PAIR_LOSSES = {"contrastive": ContrastiveLoss, "multi_similarity": MultiSimilarityLoss}   # ffc-train's --xbm-loss
