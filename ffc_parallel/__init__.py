"""ffc_parallel: class-sharded classifier heads for DeepSpeed training with millions to a billion classes.

    import ffc_parallel as fp
    fp.init_distributed()
    head = fp.ShardedClassifier(embedding_dim=512, num_classes=10_000_000, margin="arcface", sample_rate=0.1)
    loss = head(local_embeddings, local_labels)   # mean over the global batch, same on every rank

The head is a drop-in layer: inside any model given to ``deepspeed.initialize`` it follows DeepSpeed's
optimizer; ``fp.save_checkpoint`` / ``fp.load_checkpoint`` replace ``engine.save_checkpoint`` /
``engine.load_checkpoint`` so that every rank's class rows are kept. The packages follow the data path
(``docs/architecture.md``): ``data`` -> ``models`` -> ``distributed`` -> ``heads`` -> ``losses`` /
``algorithms`` -> ``optim`` and the engine; ``evaluation``, ``checkpoint``, ``planner``, ``cli``.
"""
from .compat import moved_names
from .distributed import DistributedInfo, exit_distributed, get_rank, get_world_size, init_distributed
from .heads import CombinedMargin, ShardedClassifier, shard_range
from . import algorithms, data, evaluation, losses, models, planner
from .algorithms import FFC, ClassPool, HardestClassSmoothing, contrastive_prior, instance_classifier
from .engine import HybridEngine, HybridModel, initialize
from .checkpoint import load_checkpoint, save_checkpoint
from .checkpoint_files import CheckpointError

__version__ = "0.1.0"

__all__ = ["FFC", "CheckpointError", "ClassPool", "CombinedMargin", "DistributedInfo", "HardestClassSmoothing", "HybridEngine",
           "HybridModel", "ShardedClassifier", "algorithms", "contrastive_prior", "data", "evaluation",
           "exit_distributed", "get_rank", "get_world_size", "init_distributed", "initialize", "instance_classifier",
           "load_checkpoint", "losses", "models", "planner", "save_checkpoint", "shard_range"]

__getattr__ = moved_names(__name__, {"FFCEngine": "ffc_parallel.engine:HybridEngine"})
