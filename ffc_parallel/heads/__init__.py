"""Class-sharded classifier heads and their losses."""
from .margins import CombinedMargin, resolve_margin
from .sharded import ShardedClassifier, shard_range
from .softmax_ce import ChunkPlan, ShardedMarginSoftmaxCE

__all__ = ["ChunkPlan", "CombinedMargin", "ShardedClassifier", "ShardedMarginSoftmaxCE",
           "resolve_margin", "shard_range"]
