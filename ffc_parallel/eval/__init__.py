"""Evaluation: verification (TAR@FAR, ROC AUC), retrieval (Recall@K), top-k accuracy through the sharded
head, accuracy by class-frequency bucket."""
from .metrics import (BUCKET_NAMES, bucket_accuracy, pair_scores, recall_at_k, roc_auc, roc_curve, tar_at_far,
                      topk_accuracy)
from .runner import embed, evaluate

__all__ = ["BUCKET_NAMES", "bucket_accuracy", "embed", "evaluate", "pair_scores", "recall_at_k", "roc_auc",
           "roc_curve", "tar_at_far", "topk_accuracy"]
