"""Evaluation: verification (TAR@FAR, ROC AUC; insightface's .bin sets and 10-fold accuracy), retrieval
(Recall@K), top-k accuracy through the sharded head, accuracy by class-frequency bucket, kNN and linear
probes of frozen features."""
from .metrics import (BUCKET_NAMES, bucket_accuracy, pair_scores, recall_at_k, roc_auc, roc_curve, tar_at_far,
                      topk_accuracy)
from .probes import feature_probes, knn_accuracy, linear_probe_accuracy
from .runner import classify, embed, evaluate
from .verification import (VerificationSet, evaluate_verification, load_verification_bin, ten_fold_accuracy,
                           verification_metrics, write_verification_bin)

__all__ = ["BUCKET_NAMES", "bucket_accuracy", "classify", "embed", "evaluate", "feature_probes", "knn_accuracy",
           "linear_probe_accuracy", "pair_scores", "recall_at_k", "roc_auc", "roc_curve", "tar_at_far",
           "topk_accuracy", "VerificationSet", "evaluate_verification", "load_verification_bin",
           "ten_fold_accuracy", "verification_metrics", "write_verification_bin"]
