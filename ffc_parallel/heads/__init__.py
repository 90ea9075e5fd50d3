"""Class-sharded classifier heads and their losses."""
from .margins import CombinedMargin, resolve_margin
from .row_loss import CrossEntropy, RowLoss
from .sharded import ShardedClassifier, shard_range
from .softmax_ce import ChunkPlan, ShardedMarginSoftmaxCE, Targets
from .ffc import FFC, ClassPool, pool_loss  # noqa: F401
from .instance import (HardestClassSmoothing, contrastive_prior, hardest_class_neighbours,  # noqa: F401
                       instance_classifier, knn_accuracy, linear_probe_accuracy)

__all__ = ["ChunkPlan", "CombinedMargin", "CrossEntropy", "RowLoss", "ShardedClassifier",
           "ShardedMarginSoftmaxCE", "Targets", "resolve_margin", "shard_range"]
