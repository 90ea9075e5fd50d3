"""The class-sharded classifier head: ShardedClassifier, its margins, Partial FC sampling, row losses and the
fused chunked kernel (``softmax_ce``)."""
from ..compat import moved_names
from .margins import CombinedMargin, resolve_margin
from .row_loss import CrossEntropy, RowLoss
from .classifier import ShardedClassifier, shard_range

__all__ = ["CombinedMargin", "CrossEntropy", "RowLoss", "ShardedClassifier", "resolve_margin", "shard_range"]

__getattr__ = moved_names(__name__, {
    **{name: "ffc_parallel.algorithms" for name in ("FFC", "ClassPool", "pool_loss", "HardestClassSmoothing",
                                                     "contrastive_prior", "hardest_class_neighbours",
                                                     "instance_classifier")},
    **{name: "ffc_parallel.evaluation" for name in ("knn_accuracy", "linear_probe_accuracy")},
    **{name: "ffc_parallel.heads.softmax_ce" for name in ("ChunkPlan", "ShardedMarginSoftmaxCE", "Targets")}})
