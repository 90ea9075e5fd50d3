"""ffc_parallel: class-sharded classifier heads for DeepSpeed training with millions to a billion classes.

    import ffc_parallel as fp
    fp.init_distributed()
    head = fp.ShardedClassifier(embedding_dim=512, num_classes=10_000_000, margin="arcface", sample_rate=0.1)
    loss = head(local_embeddings, local_labels)   # mean over the global batch, same on every rank

The head is a drop-in layer: inside any model given to ``deepspeed.initialize`` it follows DeepSpeed's
optimizer; ``fp.save_checkpoint`` / ``fp.load_checkpoint`` replace ``engine.save_checkpoint`` /
``engine.load_checkpoint`` so that every rank's class rows are kept.
"""
from .distributed import DistributedInfo, exit_distributed, get_rank, get_world_size, init_distributed
from .heads import CombinedMargin, ShardedClassifier, shard_range
from . import losses  # noqa: F401  (fp.losses.CrossBatchMemory, re-weighting row losses)
from . import planner  # noqa: F401  (fp.planner.plan, capacity planning; also ffc-plan)
from . import data, eval, models  # noqa: F401  (fp.data sources, fp.eval metrics, fp.models backbones)
from .engine import FFCEngine, HybridModel, initialize
from .checkpoint import load_checkpoint, save_checkpoint
from .heads import FFC, ClassPool, HardestClassSmoothing, contrastive_prior, instance_classifier  # noqa: F401

__version__ = "0.1.0"

__all__ = ["CombinedMargin", "DistributedInfo", "FFCEngine", "HybridModel", "ShardedClassifier",
           "exit_distributed", "get_rank", "get_world_size", "init_distributed", "initialize", "load_checkpoint",
           "save_checkpoint", "shard_range"]
