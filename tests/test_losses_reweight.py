"""Re-weighting losses on the sharded head (CS_CE, CB_CE, softmax focal, CB_Focal, sigmoid focal) vs
dense float64 references on 1, 2 and 4 real ranks, with margins, chunking and Partial FC."""
import pytest
import torch

import ffc_parallel as fp
from ffc_parallel.losses import (DeferredReweighting, SoftmaxFocal, WeightedCrossEntropy, cb_weights,
                                 configure_reweighting, cs_weights, shard_class_counts)
from ffc_parallel.testing import run_ranks
from tests.cases_longtail import reweighting_matches_dense

METHODS = ["cs_ce", "cb_ce", "focal", "cb_focal", "sigmoid_focal", "cb_sigmoid_focal"]
FULL = dict(num_classes=13, dim=6, methods=METHODS, margins=["arcface", "cosface", "softmax"], chunk_sizes=[None, 3])
PARTIAL = dict(num_classes=41, dim=6, methods=METHODS, margins=["arcface"], chunk_sizes=[None, 4], sample_rate=0.3,
               alpha=0.25, reduction="mean", filter_threshold=0.2, prior=0.01)


def test_one_rank_every_method_every_margin_and_partial_fc():
    reweighting_matches_dense(batch_sizes=[7], **FULL)
    reweighting_matches_dense(batch_sizes=[7], **PARTIAL)


@pytest.mark.parametrize("world,batch_sizes", [(2, [4, 3]), (4, [3, 2, 0, 4])])
def test_multi_rank_every_method_matches_dense(world, batch_sizes):
    results = run_ranks("tests.cases_longtail:reweighting_suite", world, timeout=240, kwargs=dict(
        runs=[dict(batch_sizes=batch_sizes, **dict(FULL, margins=["arcface", "cosface"], chunk_sizes=[3])),
              dict(batch_sizes=batch_sizes, **dict(PARTIAL, chunk_sizes=[4]))],
        formulas_classes=11, zero_weight_classes=9))
    errors = {r["zero_weight_error"] for r in results}
    assert len(errors) == 1, f"ranks raised different errors: {errors}"
    assert "class weights of every label in the global batch are 0" in errors.pop()


def test_focal_derivative_matches_autograd_for_every_gamma():
    log_p = -torch.tensor([1e-12, 1e-6, 0.01, 0.3, 1.0, 4.0, 30.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 0.1, 1.0], dtype=torch.float64)
    for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
        for reduction in ("weighted_mean", "mean"):
            loss, grad = SoftmaxFocal(gamma, reduction)(log_p, weights)
            x = log_p.clone().requires_grad_()
            p = x.exp()
            norm = weights.sum() if reduction == "weighted_mean" else 7.0
            ref = (weights * -(1 - p) ** gamma * x).sum() / norm
            ref.backward()
            assert torch.allclose(loss, ref) and torch.allclose(grad, x.grad, rtol=1e-9, atol=1e-12), gamma
    loss, grad = WeightedCrossEntropy()(log_p, None)
    assert torch.allclose(loss, -log_p.mean()) and torch.allclose(grad, torch.full_like(log_p, -1 / 7))


def test_weights_configuration_and_errors():
    head = fp.ShardedClassifier(4, 6)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 5])       # class 4 has no sample
    counts = shard_class_counts(labels, head.class_range)
    assert counts.tolist() == [4, 2, 1, 2, 0, 1]
    w = cs_weights(counts, gamma=1.0)
    assert torch.allclose(w, torch.tensor([0.25, 0.5, 1.0, 0.5, 0.0, 1.0], dtype=torch.float64))
    w = cb_weights(counts, beta=0.5)
    raw = torch.tensor([0.5 / (1 - 0.5 ** 4), 0.5 / 0.75, 1.0, 0.5 / 0.75, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(w, raw / raw.sum() * 5) and abs(float(w.sum()) - 5) < 1e-12
    configure_reweighting(head, "cb_focal", counts, beta=0.5, focal_gamma=1.5)
    assert isinstance(head.row_loss, SoftmaxFocal) and head.row_loss.gamma == 1.5
    assert torch.allclose(head.class_weight.double(), w)
    configure_reweighting(head, "ce")
    assert head.class_weight is None and isinstance(head.row_loss, WeightedCrossEntropy)
    with pytest.raises(ValueError, match="needs this rank's class counts"):
        configure_reweighting(head, "cs_ce")
    with pytest.raises(ValueError, match="unknown re-weighting"):
        configure_reweighting(head, "cb")
    with pytest.raises(ValueError, match=r"shape \[num_local\] = \[6\]"):
        configure_reweighting(head, "cb_ce", torch.ones(5))
    with pytest.raises(ValueError, match="beta must be in"):
        cb_weights(counts, beta=1.0)


def test_deferred_reweighting_switches_weights_at_the_epoch():
    head = fp.ShardedClassifier(4, 3)
    after = torch.tensor([1.0, 2.0, 3.0])
    drw = DeferredReweighting(5, after)
    drw.apply(head, 4)
    assert head.class_weight is None
    drw.apply(head, 5)
    assert torch.equal(head.class_weight, after)
    drw.apply(head, 2)   # resuming at an earlier epoch restores the first stage
    assert head.class_weight is None
