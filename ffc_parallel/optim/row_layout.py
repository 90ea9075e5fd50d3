"""What one class row of a head costs wherever it is stored: the tensors a row carries and their bytes.

A row of a rank's centers carries, besides its ``D`` weights, the fp32 master copy of half-precision
centers and the optimizer state of :class:`~ffc_parallel.optim.center_optimizer.ShardedCenterOptimizer`
(SGD momentum, or Adam's two moments, in the state dtype, and a per-row step count). The center store
(``optim/center_store.py``) lays out its files by :func:`row_layout`, and the planner sizes every storage
tier by :func:`row_bytes`, so the two cannot drift.
"""
from __future__ import annotations

import torch

TIERS = ("device", "host", "disk")
PAGE_BYTES = 4096  # the unit a disk tier reads and writes (one memory page)
RUN_BYTES = 2048   # a disk store moves runs of adjacent rows this long by preadv/pwritev, the rest via its mapping


def default_sample_block(dim: int, center_dtype_bytes: int) -> int:
    """Rows per block of block negative sampling by default: the rows of 64 KiB of weights (16 pages)."""
    return max(1, 16 * PAGE_BYTES // (dim * center_dtype_bytes))


def state_dtype(center_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the optimizer state (and the update arithmetic) of ``center_dtype`` centers."""
    return torch.float32 if center_dtype in (torch.float16, torch.bfloat16) else center_dtype


def row_layout(dim: int, center_dtype: torch.dtype, optimizer: str | None, momentum: float = 0.0,
               master_weights: bool | None = None) -> dict[str, tuple[torch.dtype, int]]:
    """``{tensor name: (dtype, values per row)}`` of one row: ``weight``, then ``master`` (half-precision
    centers with master weights, the default for them), the optimizer's state tensors (names as in
    ``ShardedCenterOptimizer.state``) and ``step``. ``optimizer``: "sgd", "adam", "adamw" or None (none)."""
    half = center_dtype in (torch.float16, torch.bfloat16)
    layout = {"weight": (center_dtype, dim)}
    if half and (master_weights if master_weights is not None else True):
        layout["master"] = (torch.float32, dim)
    sdt = state_dtype(center_dtype)
    if optimizer == "sgd" and momentum != 0:
        layout["momentum_buffer"] = (sdt, dim)
    elif optimizer in ("adam", "adamw"):
        layout["exp_avg"] = (sdt, dim)
        layout["exp_avg_sq"] = (sdt, dim)
    if optimizer is not None:
        layout["step"] = (torch.int64, 1)
    return layout


def row_bytes(layout: dict[str, tuple[torch.dtype, int]]) -> int:
    """Bytes of one row over every tensor of ``layout``."""
    return sum(dtype.itemsize * width for dtype, width in layout.values())
