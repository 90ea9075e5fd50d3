"""Pair losses against values worked out by hand."""
import math

import torch

from ffc_parallel.losses import ContrastiveLoss, MultiSimilarityLoss

# Unit vectors with hand-checkable cosines: a.b = 0.6, a.c = 0, a.d = -1, b.c = 0.8, b.d = -0.6, c.d = 0.
POINTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])


def _inputs():
    sim = POINTS @ POINTS.t()
    same = LABELS[:, None] == LABELS[None, :]
    valid = ~torch.eye(4, dtype=torch.bool)
    return sim, same, valid


def test_contrastive_by_hand():
    sim, same, valid = _inputs()
    per_anchor = ContrastiveLoss(0.5)(sim, same, valid)
    # a: 1-0.6 | b: 1-0.6 + (0.8-0.5) | c: 1-0 + (0.8-0.5) | d: 1-0 (negatives below the margin: 0)
    assert torch.allclose(per_anchor, torch.tensor([0.4, 0.7, 1.3, 1.0], dtype=torch.float64))
    # Self pairs are excluded by `valid`, not by a similarity threshold: a duplicate point still counts.
    dup_sim = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    out = ContrastiveLoss(0.5)(dup_sim, torch.tensor([[True, False]]), torch.tensor([[False, True]]))
    assert torch.allclose(out, torch.tensor([0.5], dtype=torch.float64))


def test_multi_similarity_by_hand():
    sim, same, valid = _inputs()
    per_anchor = MultiSimilarityLoss(alpha=2, beta=50, base=0.5, epsilon=0.1)(sim, same, valid)
    lse = lambda *xs: math.log(1 + sum(math.exp(x) for x in xs))  # noqa: E731
    # Mining by hand (keep neg if s + 0.1 > min pos; keep pos if s - 0.1 < max neg):
    # a: pos {b .6}, neg {c 0, d -1}: no negative above 0.5 -> 0
    # b: pos {a .6}, neg {c .8 kept, d -.6 dropped}; pos .6 - .1 < .8 kept
    # c: pos {d 0}, neg {a 0 kept, b .8 kept}
    # d: pos {c 0}, neg {a -1 dropped, b -.6 dropped} -> 0
    expected = [0.0,
                lse(-2 * (0.6 - 0.5)) / 2 + lse(50 * (0.8 - 0.5)) / 50,
                lse(-2 * (0.0 - 0.5)) / 2 + lse(50 * (0.0 - 0.5), 50 * (0.8 - 0.5)) / 50,
                0.0]
    assert torch.allclose(per_anchor, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_pair_losses_are_differentiable_and_finite_with_empty_rows():
    sim = torch.tensor([[0.3, 0.9], [0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    same = torch.tensor([[True, False], [False, False]])
    valid = torch.tensor([[True, True], [True, False]])
    for loss in (ContrastiveLoss(), MultiSimilarityLoss()):
        out = loss(sim, same, valid).sum()
        out.backward()
        assert torch.isfinite(sim.grad).all()
        sim.grad = None
