"""Single-process metrics: ROC / TAR@FAR / AUC for verification, Recall@K for retrieval, top-k accuracy
and accuracy by class-frequency bucket. Inputs are CPU tensors or arrays; results are Python floats."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BUCKET_NAMES = ("tail", "medium", "head")


def roc_curve(scores, is_same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: a pair is accepted when ``score >= threshold``; one point per distinct
    score in decreasing order, after the point (0, 0) at threshold ``+inf``."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(is_same, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("an ROC curve needs both positive (same) and negative (different) pairs")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_value], np.cumsum(~y)[last_of_value]
    return (np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()], np.r_[np.inf, s[last_of_value]])


def roc_auc(scores, is_same) -> float:
    """Area under the ROC curve (trapezoids; a tie between a positive and a negative counts one half)."""
    fpr, tpr, _ = roc_curve(scores, is_same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tar_at_far(scores, is_same, far: float) -> tuple[float, float, float]:
    """``(TAR, achieved FAR, threshold)`` at a false accept rate of at most ``far``.

    With ``N`` negative scores sorted in decreasing order, ``k = floor(far * N)`` false accepts are
    allowed; the threshold is the ``(k+1)``-th highest negative score and a pair is accepted when its
    score is strictly above it (``-inf`` when ``k >= N``). TAR is the accepted fraction of positives.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(is_same, dtype=bool)
    neg, pos = np.sort(s[~y])[::-1], s[y]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs both positive and negative pairs")
    k = int(math.floor(far * len(neg) + 1e-9))
    threshold = neg[k] if k < len(neg) else -np.inf
    return float((pos > threshold).mean()), float((neg > threshold).mean()), float(threshold)


def pair_scores(embeddings: torch.Tensor, identities: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-identity flag of every unordered pair ``i < j`` of ``embeddings[n, D]``."""
    x = F.normalize(embeddings.double(), dim=1)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    sims = (x @ x.t())[i, j]
    return sims.numpy(), (identities[i] == identities[j]).numpy()


def recall_at_k(embeddings: torch.Tensor, identities: torch.Tensor, ks=(1, 5), chunk: int = 1024) -> dict:
    """Leave-one-out retrieval: each item queries all the others by cosine; Recall@K is the fraction of
    queries with an item of the same identity among their K nearest. Queries whose identity has no
    other item are skipped. Returns ``{k: recall}``."""
    x = F.normalize(embeddings.double(), dim=1)
    ids = torch.as_tensor(identities)
    has_mate = torch.bincount(ids)[ids] > 1
    kmax = min(max(ks), len(x) - 1)
    hits = {k: 0 for k in ks}
    for lo in range(0, len(x), chunk):
        sims = x[lo: lo + chunk] @ x.t()
        rows = torch.arange(lo, min(lo + chunk, len(x)))
        sims[torch.arange(len(rows)), rows] = -math.inf  # never retrieve the query itself
        nearest = sims.topk(kmax, dim=1).indices
        match = (ids[nearest] == ids[rows, None]) & has_mate[rows, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    queries = int(has_mate.sum())
    if queries == 0:
        raise ValueError("Recall@K needs at least one identity with two or more items")
    return {k: hits[k] / queries for k in ks}


def topk_accuracy(predicted: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """``predicted[n, K]`` class ids in decreasing score order -> ``{k: fraction with the label in the first k}``."""
    correct = predicted == labels[:, None]
    return {k: float(correct[:, :k].any(dim=1).float().mean()) for k in ks}


def bucket_accuracy(correct, labels, class_buckets) -> dict:
    """Mean of ``correct[n]`` (bool) per frequency bucket of each sample's class:
    ``{"tail": acc or None, "medium": ..., "head": ...}`` (None when a bucket has no sample)."""
    correct = np.asarray(correct, dtype=bool)
    bucket = np.asarray(class_buckets)[np.asarray(labels)]
    return {name: (float(correct[bucket == b].mean()) if (bucket == b).any() else None)
            for b, name in enumerate(BUCKET_NAMES)}
