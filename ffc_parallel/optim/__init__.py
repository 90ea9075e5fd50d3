"""Sharded optimizers for the class centers and their agreement with DeepSpeed's step."""
from .consensus import CenterGradientHooks, center_grad_stats
from .sharded import ShardedCenterOptimizer

__all__ = ["CenterGradientHooks", "ShardedCenterOptimizer", "center_grad_stats"]
