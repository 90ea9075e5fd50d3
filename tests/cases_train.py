"""Per-rank bodies of the evaluation and training tests (run through ffc_parallel.testing.run_ranks)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.evaluation import bucket_accuracy, evaluate, pair_scores, recall_at_k, roc_auc, tar_at_far
from ffc_parallel.heads.classifier import init_class_rows
from ffc_parallel.models import MLP


def evaluate_matches_dense(num_classes: int = 13, dim: int = 8) -> list:
    """fp.eval.evaluate on this rank's slice == a dense one-process computation of every metric,
    also when a rank's slice of the held-out set is empty (1 image on 2 ranks)."""
    return [_evaluate_case(num_classes, dim, num_seen) for num_seen in (11, 1)]


def _evaluate_case(num_classes: int, dim: int, num_seen: int) -> dict:
    g = torch.Generator().manual_seed(0)
    seen_x, seen_y = torch.randn(num_seen, 5, generator=g), torch.randint(0, num_classes, (num_seen,), generator=g)
    unseen_x, unseen_ids = torch.randn(9, 5, generator=g), torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    torch.manual_seed(1)
    backbone = MLP((5,), dim, hidden=(16,)).eval()
    head = fp.ShardedClassifier(dim, num_classes, margin="arcface", seed=3)
    buckets = np.arange(num_classes) % 3
    metrics, curves = evaluate(backbone, head, (seen_x, seen_y), (unseen_x, unseen_ids), buckets, batch_size=4)

    with torch.no_grad():
        weight = F.normalize(init_class_rows(0, num_classes, dim, 0.01, 3), dim=1)
        top5 = (F.normalize(backbone(seen_x), dim=1) @ weight.t()).topk(5, dim=1).indices
        correct = top5 == seen_y[:, None]
        emb = backbone(unseen_x)
    assert metrics["top1_seen"] == float(correct[:, 0].float().mean())
    assert metrics["top5_seen"] == float(correct.any(1).float().mean())
    for name, acc in bucket_accuracy(correct[:, 0].numpy(), seen_y.numpy(), buckets).items():
        assert metrics[f"acc_{name}"] == acc
    scores, same = pair_scores(emb, unseen_ids)
    assert np.isclose(metrics["tar_at_far_1e-3"], tar_at_far(scores, same, 1e-3)[0])
    assert np.isclose(metrics["roc_auc"], roc_auc(scores, same))
    assert np.isclose(metrics["recall_at_1"], recall_at_k(emb, unseen_ids)[1])
    assert metrics["verification_pairs"] == 36 and len(curves["fpr"]) == len(curves["tpr"])
    return metrics


def train_run(argv: list) -> dict | None:
    """``ffc-train`` with ``argv`` on this rank; rank 0 returns the metrics."""
    from ffc_parallel.cli.train import parse_options, train
    return train(parse_options(argv))
