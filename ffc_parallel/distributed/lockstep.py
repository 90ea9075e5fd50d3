"""Iterating on every rank in lockstep, so that collectives inside a loop never hang on uneven data, and
a batch that fails to load on one rank stops every rank at once with that rank's error."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_
from .init import get_rank, get_world_size

_FAILED = 1 << 20   # a rank's step status when loading its next batch raised (alive ranks count 1 each)


class PeerFailure(RuntimeError):
    """Another rank could not load its next batch; the message carries that rank's error."""


def lockstep(batches, group=None, progress: bool = False, desc: str = ""):
    """Iterate ``batches`` on every rank of ``group`` in lockstep: yields this rank's next batch, or
    ``None`` once this rank has run out while another has not, until every rank has run out. Ranks may
    hold different numbers of batches. Costs one one-integer all-reduce per step; ``progress`` shows a
    bar on rank 0. A batch that raises while loading stops every rank (see :func:`in_step`)."""
    iterator = iter(batches)
    bar = None
    if progress and get_rank(group) == 0:
        from tqdm import tqdm
        bar = tqdm(desc=desc, unit="batch", total=_length(batches))
    while True:
        batch, alive = _next_agreed(iterator, group)
        if not alive:
            break
        if bar is not None:
            bar.update(1)
        yield batch
    if bar is not None:
        bar.close()


def in_step(batches, group=None):
    """Iterate ``batches``, of which every rank of ``group`` holds equally many: when loading one raises
    on some rank, that rank re-raises its error and every other rank raises :class:`PeerFailure` naming
    it, at the same step, instead of waiting for it in the next collective. Costs one one-integer
    all-reduce per step."""
    iterator = iter(batches)
    while True:
        batch, alive = _next_agreed(iterator, group)
        if alive == 0:
            return
        if alive < get_world_size(group):
            raise RuntimeError(f"rank {get_rank(group)}: only {alive} of {get_world_size(group)} ranks have a "
                               f"next batch; every rank must hold equally many")
        yield batch


def _next_agreed(iterator, group) -> tuple:
    """``(this rank's next batch or None, number of ranks that have one)``; raises on every rank when
    loading failed on one (the second collective runs only then)."""
    try:
        batch, error = next(iterator, None), None
    except Exception as exc:
        batch, error = None, exc
    world = get_world_size(group)
    if world == 1:
        if error is not None:
            raise error
        return batch, int(batch is not None)
    status = torch.tensor([_FAILED if error is not None else int(batch is not None)])
    if dist.get_backend(group) == "nccl":
        status = status.cuda()
    total = int(all_reduce_(status, group=group))
    if total < _FAILED:
        return batch, total
    messages = [None] * world
    dist.all_gather_object(messages, None if error is None else _last_line(error), group=group)
    if error is not None:
        raise error
    raise PeerFailure("; ".join(f"rank {r} could not load its next batch: {m}"
                                for r, m in enumerate(messages) if m is not None))


def _last_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, only the last line of a message that embeds a traceback (DataLoader
    workers' errors do)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if len(lines) > 1 else f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _length(batches):
    try:
        return len(batches)
    except TypeError:
        return None
