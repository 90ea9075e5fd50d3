"""Evaluation metrics against hand-computed examples and scikit-learn; distributed evaluate vs one process."""
import numpy as np
import pytest
import torch

from ffc_parallel.evaluation import (bucket_accuracy, pair_scores, recall_at_k, roc_auc, roc_curve, tar_at_far,
                               topk_accuracy)
from ffc_parallel.testing import run_ranks


def test_roc_curve_and_auc_by_hand():
    scores, same = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    fpr, tpr, thr = roc_curve(scores, same)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thr[0] == np.inf and thr[1:].tolist() == scores
    # Positive-negative pairs ordered correctly: (0.9>0.8), (0.9>0.6), (0.7>0.6); wrong: (0.7<0.8) -> 3/4.
    assert roc_auc(scores, same) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie counts one half
    with pytest.raises(ValueError, match="both positive"):
        roc_curve([0.1, 0.2], [True, True])


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.normal(size=500) + y, 1)  # rounding makes many ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_tar_at_far_by_hand():
    neg = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    pos = [0.95, 0.85, 0.5]
    scores, same = pos + neg, [True] * 3 + [False] * 10
    # FAR 0.1 of 10 negatives: one false accept allowed; threshold = 2nd highest negative (0.8).
    assert tar_at_far(scores, same, 0.1) == pytest.approx((2 / 3, 0.1, 0.8))
    # FAR 0.01: no false accept; threshold = highest negative (0.9); only 0.95 passes.
    assert tar_at_far(scores, same, 0.01) == pytest.approx((1 / 3, 0.0, 0.9))
    # FAR 0.3: three false accepts allowed, threshold 0.6: 0.95 and 0.85 pass, 0.5 does not.
    assert tar_at_far(scores, same, 0.3) == pytest.approx((2 / 3, 0.3, 0.6))
    assert tar_at_far(scores, same, 1.0)[0] == 1.0


def test_pair_scores_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    sims, same = pair_scores(emb, torch.tensor([0, 0, 1]))
    assert sims == pytest.approx([0.0, 1 / np.sqrt(2), 1 / np.sqrt(2)]) and same.tolist() == [True, False, False]


def test_recall_at_k_by_hand():
    # Angles (degrees) on the circle; identities a, a, b, b, c (c alone: not a query).
    angles = torch.tensor([0.0, 50.0, 10.0, 110.0, 60.0]) * np.pi / 180
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    ids = torch.tensor([0, 0, 1, 1, 2])
    # Neighbours by angle; first same identity at rank: 0 -> 10, [50]: 2;  50 -> 60, 10, [0]: 3;
    # 10 -> 0, 50, 60, [110]: 4;  110 -> 60, 50, [10]: 3.  Item 60 has no mate and is not a query.
    r = recall_at_k(emb, ids, ks=(1, 2, 3, 5))
    assert r == {1: 0.0, 2: 0.25, 3: 0.75, 5: 1.0}


def test_topk_and_bucket_accuracy_by_hand():
    predicted = torch.tensor([[3, 1, 2], [0, 2, 1], [1, 0, 2], [2, 0, 1]])
    labels = torch.tensor([3, 2, 0, 1])
    assert topk_accuracy(predicted, labels, ks=(1, 2, 3)) == {1: 0.25, 2: 0.75, 3: 1.0}
    buckets = np.array([2, 0, 0, 1])  # class 0 head, class 3 medium, classes 1, 2 tail
    correct = (predicted[:, 0] == labels).numpy()   # [True, False, False, False]
    assert bucket_accuracy(correct, labels.numpy(), buckets) == {"tail": 0.0, "medium": 1.0, "head": 0.0}
    assert bucket_accuracy([True], [1], np.array([0, 0]))["head"] is None


@pytest.mark.timeout(180)
def test_distributed_evaluate_matches_one_process():
    results = run_ranks("tests.cases_train:evaluate_matches_dense", world_size=2, launcher="torchrun", timeout=120)
    assert results[0] == results[1]
