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
import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set before
# torch's first allocation (it is read once). A rank's large per-step buffers (the rows of a step, their
# fp32 copies, the loss's tiles) are allocated afresh each step, and each 4 KiB page of them faults in:
# on a CPU head about 5x the time of the copy itself (docs/benchmarks.md). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .compat import moved_names  # noqa: E402
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
