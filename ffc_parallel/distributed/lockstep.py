"""Iterating on every rank in lockstep, so that collectives inside a loop never hang on uneven data."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_
from .init import get_rank


def lockstep(batches, group=None, progress: bool = False, desc: str = ""):
    """Iterate ``batches`` on every rank of ``group`` in lockstep: yields this rank's next batch, or
    ``None`` once this rank has run out while another has not, until every rank has run out. Ranks may
    hold different numbers of batches. Costs one one-integer all-reduce per step; ``progress`` shows a
    bar on rank 0."""
    iterator = iter(batches)
    bar = None
    if progress and get_rank(group) == 0:
        from tqdm import tqdm
        bar = tqdm(desc=desc, unit="batch", total=_length(batches))
    while True:
        batch = next(iterator, None)
        alive = torch.tensor([int(batch is not None)])
        if dist.is_initialized() and dist.get_backend(group) == "nccl":
            alive = alive.cuda()
        if not int(all_reduce_(alive, group=group)):
            break
        if bar is not None:
            bar.update(1)
        yield batch
    if bar is not None:
        bar.close()


def _length(batches):
    try:
        return len(batches)
    except TypeError:
        return None
