"""Sharded optimizers for the class centers and how they follow DeepSpeed's step."""
from .centers import CenterTrainer, center_grad_stats
from .center_optimizer import ShardedCenterOptimizer

__all__ = ["CenterTrainer", "ShardedCenterOptimizer", "center_grad_stats"]
