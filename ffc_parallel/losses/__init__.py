"""Losses for long-tailed data and metric learning: re-weighting on the sharded head, pair losses,
cross-batch memory."""
from .reweight import (REWEIGHTING, DeferredReweighting, ShardedSigmoidFocal, SoftmaxFocal, WeightedCrossEntropy,
                       cb_weights, configure_reweighting, cs_weights, shard_class_counts)

__all__ = ["REWEIGHTING", "DeferredReweighting", "ShardedSigmoidFocal", "SoftmaxFocal", "WeightedCrossEntropy",
           "cb_weights", "configure_reweighting", "cs_weights", "shard_class_counts"]
