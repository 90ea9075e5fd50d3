"""Distributed end-of-run evaluation of a backbone and a :class:`~ffc_parallel.ShardedClassifier`.

Every rank embeds its own slice of each evaluation set. Seen identities are classified through the
head's distributed top-k (each rank scores its own class shard); the unseen embeddings are gathered to
every rank, which all compute the same verification and retrieval numbers.
"""
from __future__ import annotations

import numpy as np
import torch

from ..distributed.collectives import gather_rows
from ..distributed.init import get_rank, get_world_size
from .metrics import (BUCKET_NAMES, bucket_accuracy, pair_scores, recall_at_k, roc_auc, roc_curve, tar_at_far,
                      topk_accuracy)


def _my_slice(n: int, rank: int, world: int) -> tuple[slice, list[int]]:
    sizes = [len(part) for part in np.array_split(np.arange(n), world)]
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank]), sizes


@torch.no_grad()
def embed(backbone, inputs: torch.Tensor, batch_size: int = 512, device="cpu") -> torch.Tensor:
    """``backbone(inputs)`` in batches, in eval mode (restored afterwards): ``[n, D]`` float32 on CPU."""
    was_training = backbone.training
    backbone.eval()
    dtype = next(backbone.parameters()).dtype
    try:
        out = [backbone(inputs[i: i + batch_size].to(device=device, dtype=dtype)).float().cpu()
               for i in range(0, max(len(inputs), 1), batch_size)]  # an empty slice still gives [0, D]
    finally:
        backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(backbone, head, seen, unseen, class_buckets, *, batch_size: int = 512, device="cpu",
             group=None, fars=(1e-3, 1e-4)) -> tuple[dict, dict]:
    """Evaluate on ``seen = (inputs, labels)`` (held-out images of training classes) and
    ``unseen = (inputs, identities)``; every rank of ``group`` must call it with the same sets.
    ``head=None`` (a model without a class per training identity: FFC's pool, instance
    classification) skips the seen-class classification.

    Returns ``(metrics, curves)``: metrics ``top1_seen``, ``top5_seen``, ``acc_<bucket>`` (bucket of
    ``class_buckets[C]``: 0 tail, 1 medium, 2 head), ``tar_at_far_<far>``, ``roc_auc``,
    ``recall_at_1``, ``recall_at_5``; curves ``fpr``/``tpr`` (lists) for an ROC plot.
    """
    rank, world = get_rank(group), get_world_size(group)
    head_was_training = head is not None and head.training
    if head is not None:
        head.eval()
    metrics, curves = {}, {}
    try:
        if head is not None:
            metrics.update(classify(backbone, head, seen, class_buckets, batch_size=batch_size, device=device,
                                        group=group))
        x, identities = unseen
        part, sizes = _my_slice(len(x), rank, world)
        emb = gather_rows(embed(backbone, x[part], batch_size, device).to(device), sizes, group).cpu()
        scores, same = pair_scores(emb, identities)
        for far in fars:
            metrics[f"tar_at_far_{far:.0e}".replace("e-0", "e-")] = tar_at_far(scores, same, far)[0]
        metrics["roc_auc"] = roc_auc(scores, same)
        for kk, r in recall_at_k(emb, identities, (1, 5)).items():
            metrics[f"recall_at_{kk}"] = r
        metrics["unseen_images"], metrics["verification_pairs"] = len(x), len(scores)
        fpr, tpr, _ = roc_curve(scores, same)
        # A few hundred points, dense at small FAR (the curve is read on a log axis).
        keep = np.unique(np.r_[0, np.searchsorted(fpr, np.logspace(-6, 0, 400)).clip(0, len(fpr) - 1), len(fpr) - 1])
        curves["fpr"], curves["tpr"] = fpr[keep].tolist(), tpr[keep].tolist()
    finally:
        if head is not None:
            head.train(head_was_training)
    return metrics, curves


def classify(backbone, head, data, class_buckets=None, *, name: str = "seen", batch_size: int = 512, device="cpu",
             group=None) -> dict:
    """``top1_<name>``, ``top5_<name>``, ``<name>_images`` of ``data = (inputs[n, ...], labels[n])`` through the
    head's distributed top-k (every rank of ``group`` calls it with the same data), and ``acc_<bucket>`` when
    ``class_buckets[C]`` is given."""
    rank, world = get_rank(group), get_world_size(group)
    x, labels = data
    part, sizes = _my_slice(len(x), rank, world)
    emb = embed(backbone, x[part], batch_size, device)
    k = min(5, head.num_classes)
    predicted = []
    for i in range(0, max(max(sizes), 1), batch_size):  # same number of predict calls on every rank
        _, ids = head.predict(emb[i: i + batch_size].to(device), k=k)
        predicted.append(ids.cpu())
    predicted = gather_rows(torch.cat(predicted), sizes, group).cpu()
    top = topk_accuracy(predicted, labels, ks=(1, 5))
    metrics = {f"top1_{name}": top[1], f"top5_{name}": top[5]}
    if class_buckets is not None:
        for bucket, acc in bucket_accuracy((predicted[:, 0] == labels).numpy(), labels.numpy(),
                                           class_buckets).items():
            metrics[f"acc_{bucket}"] = acc
    metrics[f"{name}_images"] = len(x)
    return metrics


__all__ = ["BUCKET_NAMES", "classify", "embed", "evaluate"]
