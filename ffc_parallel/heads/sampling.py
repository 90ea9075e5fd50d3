"""Partial FC negative sampling: which local class rows a rank computes this step."""
from __future__ import annotations

import torch

_DENSE_FRACTION = 0.25  # above this share of the shard, draw by one random key per row


def sample_rows(positives: torch.Tensor, num_local: int, num_sample: int,
                generator: torch.Generator) -> torch.Tensor:
    """Sorted local row indices: all ``positives`` plus uniform negatives, ``max(P, num_sample)`` rows.

    ``positives`` is a sorted, unique int64 tensor of local rows that must be kept. Negatives are a
    uniformly random subset of the other rows. When few are needed they are found by rejection
    (O(num_sample log num_sample), no O(num_local) work); otherwise by the smallest random keys.
    """
    device = positives.device
    positives = positives.cpu()
    want = min(num_sample, num_local) - positives.numel()
    if want <= 0:
        return positives.to(device)
    free = num_local - positives.numel()
    if want > _DENSE_FRACTION * free:
        keys = torch.rand(num_local, generator=generator)
        keys[positives] = 2.0  # never among the smallest
        negatives = keys.topk(want, largest=False).indices
    else:
        found = torch.empty(0, dtype=torch.long)
        while found.numel() < want:
            draw = torch.randint(num_local, (int(want * 1.25) + 32,), generator=generator)
            found = torch.cat([found, draw]).unique()
            found = found[~torch.isin(found, positives)]
        # Distinct uniform draws, given their count, are a uniform subset; so is a random part of it.
        negatives = found[torch.randperm(found.numel(), generator=generator)[:want]]
    return torch.cat([positives, negatives]).sort().values.to(device)
