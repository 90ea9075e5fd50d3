"""Partial FC negative sampling: which local class rows a rank computes this step.

A step's negatives come from candidates drawn without knowing the batch (a pure function of the seed,
rank and step), so a head whose rows live off the device reads the next step's candidates while this
step computes. The step keeps every positive and fills up with the first candidates that are not
positives, in the candidates' random order: a uniform subset of the non-positive rows either way.
"""
from __future__ import annotations

import torch

from ..optim import row_sets

_DENSE_FRACTION = 0.25  # above this share of the shard, draw by one random key per row
NEGATIVE_SAMPLING = ("uniform", "block")


def _distinct(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct ints of ``[0, n)`` in uniformly random order: by rejection when few are
    needed (O(count log count), no O(n) work), else by the smallest of ``n`` random keys."""
    count = min(count, n)
    if count > _DENSE_FRACTION * n:
        return torch.rand(n, generator=generator).topk(count, largest=False).indices
    found = torch.empty(0, dtype=torch.long)
    while found.numel() < count:
        draw = torch.randint(n, (int((count - found.numel()) * 1.25) + 32,), generator=generator)
        found = torch.cat([found, draw]).unique()
    # Distinct uniform draws, given their count, are a uniform subset; so is a random part of it.
    return found[torch.randperm(found.numel(), generator=generator)[:count]]


def negative_candidates(num_local: int, num_sample: int, generator: torch.Generator,
                        mode: str = "uniform", block: int = 1) -> torch.Tensor:
    """``min(num_sample, num_local)`` distinct local rows in random order, drawn before the batch is
    known. ``mode="block"``: whole runs of ``block`` consecutive rows (uniformly chosen blocks), so a
    store on disk reads whole pages; ``"uniform"``: single rows."""
    if mode not in NEGATIVE_SAMPLING:
        raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got {mode!r}")
    count = min(num_sample, num_local)
    if mode == "uniform" or block <= 1:
        return _distinct(num_local, count, generator)
    blocks = _distinct(-(-num_local // block), -(-count // block) + 1, generator)
    # each block read from a random row on, cyclically: the rows a step cuts off a block are any of its rows
    turn = torch.randint(block, (blocks.numel(), 1), generator=generator)
    rows = (torch.arange(block) + turn).remainder_(block).add_(blocks.unsqueeze(1) * block).flatten()  # one [R]
    if num_local % block and bool((blocks == num_local // block).any()):   # the last block is short
        rows = rows[rows < num_local]
    return rows[:count]


def sample_rows(positives: torch.Tensor, candidates: torch.Tensor, num_sample: int) -> torch.Tensor:
    """Sorted local rows: all ``positives`` (sorted, unique) and the first candidates that are not
    positives, ``max(P, num_sample)`` rows in all (``num_sample`` at most the shard). One ``[R]``
    tensor is made: the first ``want + P`` candidates hold all that are taken."""
    device = positives.device
    positives = positives.cpu()
    want = min(num_sample, candidates.numel()) - positives.numel()
    if want <= 0:
        return positives.to(device)
    head = candidates[:want + positives.numel()]
    end = want   # candidates[:end] holds ``want`` non-positives: each positive found before ``end`` moves it on
    hits = row_sets.isin_small(head, positives)
    for h in hits.tolist():
        if h >= end:
            break
        end += 1
    taken = head[:end]
    rows = torch.empty(want + positives.numel(), dtype=torch.long)
    rows[:end] = taken
    rows[end:] = positives[~torch.isin(positives, taken.index_select(0, hits[hits < end]))]
    return row_sets.sort_(rows).to(device)
