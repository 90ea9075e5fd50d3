"""Cross-batch memory (XBM, Wang et al., CVPR 2020) for pair losses, identical on every rank.

    xbm = fp.losses.CrossBatchMemory(size=8192, dim=128, warmup_steps=1000)   # contrastive, margin 0.5
    loss = xbm(local_embeddings, local_labels)      # every step, on every rank of the group

Each call (every rank of ``group`` must call, in the same order):

1. all-gathers the (L2-normalised) embeddings and labels of every rank, in rank order: the global
   batch ``B = Σ b_r`` (``b_r`` may differ);
2. ``loss = [Σ_i L_i(batch) + weight · Σ_i L_i(memory)] / B`` over the global batch's anchors i, where
   ``L_i(batch)`` pairs anchor i with every OTHER sample of the global batch (the pair of a sample
   with itself is masked by index) and ``L_i(memory)`` pairs it with every filled memory slot. The
   memory term starts at ``warmup_steps``;
3. then, from ``warmup_steps`` on, enqueues the global batch (detached) into the ring buffer:
   oldest slots are overwritten first. Enqueueing AFTER the memory term means the current batch is
   never its own memory partner.

The returned loss is identical on every rank. Gradients follow the head's convention: each rank's
``local_embeddings.grad`` is the exact gradient of that loss (each rank computes its own anchors'
terms; the gathered references' gradients are summed back to their ranks), so the backbone gradient
is the SUM over ranks, as for :class:`~ffc_parallel.ShardedClassifier`; the two losses can be added.
Under DeepSpeed, which averages the backbone's gradients over ranks, the embedding gradient is
multiplied by the data-parallel size (``grad_multiplier``, automatic; pass the world size under DDP).

Cost per rank and step: memory ``size · (dim · elem + 8)`` bytes (labels int64), identical copies on
every rank (plus a transient copy of the filled slots for the backward); compute ``2 · b_r · (B + filled) · dim`` FLOPs for the similarities plus the pair loss
over ``b_r · (B + filled)`` pairs; communication: one all-gather of ``B · (dim + 1)`` numbers and one
all-reduce of a scalar (plus, in the backward, one reduce-scatter of ``B · dim``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..deepspeed_bridge import GradientSum
from ..distributed.checks import BatchSpec, agree_on_config, check_batch
from ..distributed.collectives import all_gather_table, gather_rows, sum_over_ranks
from ..distributed.init import get_rank, get_world_size
from .pairs import ContrastiveLoss


class CrossBatchMemory(nn.Module):
    """Ring buffer of the last ``size`` embeddings ``[size, dim]`` and labels, the same on every rank.

    Args:
        size: number of memory slots (embeddings remembered).
        dim: embedding dimension.
        pair_loss: per-anchor pair loss (``sim, same, valid -> [b]``), default
            :class:`~ffc_parallel.losses.pairs.ContrastiveLoss` with margin 0.5.
        weight: factor of the memory term.
        warmup_steps: steps (calls) before the memory term is added and the memory is filled.
        normalize: L2-normalise embeddings (similarities are cosines).
        verify: check every step, with one small all-gather, that the memory is identical on every
            rank (raises ``RuntimeError`` on every rank otherwise); :meth:`check_consistent` does it once.
        group: process group (None = world).
        grad_multiplier: factor on the embedding gradient (default: the data-parallel size when a
            DeepSpeed engine averages the backbone's gradients over ``group``, else 1).
    """

    def __init__(self, size: int, dim: int, pair_loss=None, weight: float = 1.0, warmup_steps: int = 0,
                 normalize: bool = True, verify: bool = False, group=None, dtype=torch.float32, device=None,
                 grad_multiplier: float | None = None):
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"CrossBatchMemory: size and dim must be >= 1, got {size}, {dim}")
        if warmup_steps < 0:
            raise ValueError(f"CrossBatchMemory: warmup_steps must be >= 0, got {warmup_steps}")
        self.size, self.dim = int(size), int(dim)
        self.pair_loss = pair_loss if pair_loss is not None else ContrastiveLoss(0.5)
        self.weight, self.warmup_steps = float(weight), int(warmup_steps)
        self.normalize, self.verify, self.group = normalize, verify, group
        agree_on_config("CrossBatchMemory", {"size": self.size, "dim": self.dim, "weight": self.weight,
                                             "warmup_steps": self.warmup_steps, "normalize": bool(normalize),
                                             "pair_loss": repr(self.pair_loss), "dtype": str(dtype)}, group, device)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.long, device=device))
        # [next slot to write, number of filled slots, steps taken]
        self.register_buffer("state", torch.zeros(3, dtype=torch.long, device=device))
        self.gradient_sum = GradientSum(self, group, grad_multiplier)

    @property
    def filled(self) -> int:
        return int(self.state[1])

    @property
    def step(self) -> int:
        return int(self.state[2])

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled slots ``(embeddings[filled, dim], labels[filled])``, oldest first."""
        ptr, filled = int(self.state[0]), self.filled
        if filled < self.size:
            return self.embeddings[:filled], self.labels[:filled]
        order = torch.arange(ptr, ptr + self.size, device=self.labels.device) % self.size
        return self.embeddings[order], self.labels[order]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Write rows ``[n, dim]`` (in order) into the oldest slots; the last ``size`` rows if ``n > size``."""
        n = embeddings.shape[0]
        if n > self.size:
            embeddings, labels = embeddings[n - self.size:], labels[n - self.size:]
            self.state[0] = (self.state[0] + n - self.size) % self.size
            n = self.size
        slots = (int(self.state[0]) + torch.arange(n, device=self.labels.device)) % self.size
        self.embeddings[slots] = embeddings.to(self.embeddings.dtype)
        self.labels[slots] = labels.to(torch.long)
        self.state[0] = (self.state[0] + n) % self.size
        self.state[1] = min(self.size, self.filled + n)

    @torch.no_grad()
    def check_consistent(self) -> None:
        """Raise ``RuntimeError`` on every rank unless every rank holds the same memory."""
        world = get_world_size(self.group)
        if world == 1:
            return
        weights = torch.arange(1, self.size + 1, dtype=torch.float64, device=self.labels.device)
        checksum = torch.stack([(self.embeddings.double().sum(1) * weights).sum(),
                                (self.labels.double() * weights).sum()] + [s.double() for s in self.state])
        table = all_gather_table(checksum.view(torch.long), self.group).view(torch.float64)
        differ = [r for r in range(world) if not torch.equal(table[r], table[0])]
        if differ:
            raise RuntimeError(f"CrossBatchMemory: the memory of rank(s) {differ} differs from rank 0's "
                               f"(every rank must call the memory every step with its own batch)")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """``loss`` (scalar, same on every rank) for this step; see the module docstring."""
        spec = BatchSpec("CrossBatchMemory", self.dim, "the memory's dim", label_range=None)
        sizes = [f["rows"] for f in check_batch(spec, local_embeddings, local_labels, group=self.group,
                                                device=self.labels.device)]
        x = self.gradient_sum(local_embeddings).to(self.embeddings.dtype)
        if self.normalize:
            x = F.normalize(x, dim=1)
        labels = local_labels.to(device=x.device, dtype=torch.long)
        batch_x = gather_rows(x, sizes, self.group)
        batch_y = gather_rows(labels.unsqueeze(1), sizes, self.group)[:, 0]
        offset = sum(sizes[: get_rank(self.group)])
        total = float(sum(sizes))
        self_pair = torch.zeros(x.shape[0], batch_x.shape[0], dtype=torch.bool, device=x.device)
        self_pair[torch.arange(x.shape[0]), offset + torch.arange(x.shape[0])] = True
        part = self.pair_loss(x @ batch_x.t(), labels[:, None] == batch_y[None, :], ~self_pair).sum()
        use_memory = self.step >= self.warmup_steps
        if use_memory and self.filled and self.weight:
            mem_x, mem_y = (t.clone() for t in self.memory())  # the backward needs them after the enqueue
            valid = torch.ones(x.shape[0], mem_x.shape[0], dtype=torch.bool, device=x.device)
            part = part + self.weight * self.pair_loss(x @ mem_x.t(), labels[:, None] == mem_y[None, :], valid).sum()
        loss = sum_over_ranks(part / total, self.group)   # every rank's value; this rank's part's gradient
        if use_memory:
            self.enqueue(batch_x.detach(), batch_y)
        self.state[2] += 1
        if self.verify:
            self.check_consistent()
        return loss

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, filled={self.filled}, step={self.step}, "
                f"weight={self.weight}, warmup_steps={self.warmup_steps}, pair_loss={self.pair_loss!r}")
