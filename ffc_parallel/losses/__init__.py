"""Losses for long-tailed data and metric learning: re-weighting on the sharded head, pair losses,
cross-batch memory."""
from .pairs import ContrastiveLoss, MultiSimilarityLoss
from .reweight import (REWEIGHTING, DeferredReweighting, ShardedSigmoidFocal, SoftmaxFocal, WeightedCrossEntropy,
                       cb_weights, class_weights_for, configure_reweighting, cs_weights, row_loss_for,
                       shard_class_counts)
from .xbm import CrossBatchMemory

__all__ = ["REWEIGHTING", "ContrastiveLoss", "CrossBatchMemory", "DeferredReweighting", "MultiSimilarityLoss",
           "ShardedSigmoidFocal", "SoftmaxFocal", "WeightedCrossEntropy", "cb_weights", "class_weights_for",
           "configure_reweighting", "cs_weights", "row_loss_for", "shard_class_counts"]
