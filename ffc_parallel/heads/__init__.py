"""Class-sharded classifier heads and their losses."""
from .margins import CombinedMargin, resolve_margin
from .row_loss import CrossEntropy, RowLoss
from .sharded import ShardedClassifier, shard_range
from .softmax_ce import ChunkPlan, ShardedMarginSoftmaxCE, Targets

__all__ = ["ChunkPlan", "CombinedMargin", "CrossEntropy", "RowLoss", "ShardedClassifier",
           "ShardedMarginSoftmaxCE", "Targets", "resolve_margin", "shard_range"]
