"""Probes of learned features on labelled data: weighted kNN and a linear classifier on frozen features.

No collective: one rank may call them alone (instance classification reports them from rank 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .runner import embed


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy: each test feature votes over its ``k`` most cosine-similar
    training features with weights ``exp(cos / temperature)`` (the instance-discrimination
    protocol). ``train_x[N, D]``, ``train_y[N]``, ``test_x[M, D]``, ``test_y[M]``."""
    train, num_classes = F.normalize(train_x.float(), dim=1), int(train_y.max()) + 1
    k = min(k, train.shape[0])
    correct = 0
    for lo in range(0, test_x.shape[0], chunk):
        sims, idx = (F.normalize(test_x[lo: lo + chunk].float(), dim=1) @ train.t()).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1) == test_y[lo: lo + chunk]).sum())
    return correct / max(test_x.shape[0], 1)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          weight_decay: float = 1e-4, max_iter: int = 100) -> float:
    """Top-1 accuracy of a multinomial logistic regression (full-batch L-BFGS, L2 ``weight_decay``)
    trained on frozen, standardised ``train_x`` and evaluated on ``test_x``."""
    mean, std = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    xtr, xte = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    num_classes = int(train_y.max()) + 1
    linear = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xtr), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(xte).argmax(1) == test_y).float().mean())


def feature_probes(backbone, seen, batch_size: int, device) -> dict:
    """kNN (k=20) and linear-probe top-1 of frozen features on held-out labelled images: every other
    image of ``seen = (inputs, labels)`` is the labelled bank, the rest the queries."""
    x, y = seen
    feats = F.normalize(embed(backbone, x, batch_size, device), dim=1)
    bank, queries = slice(0, None, 2), slice(1, None, 2)
    return {"knn_top1": knn_accuracy(feats[bank], y[bank], feats[queries], y[queries], k=20),
            "linear_probe_top1": linear_probe_accuracy(feats[bank], y[bank], feats[queries], y[queries]),
            "probe_images": len(x)}
