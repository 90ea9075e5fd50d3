"""The full-logits baseline: a class-sharded ArcFace head that materialises ``[B, C_local]`` logits.

It reproduces the memory and compute behaviour of insightface's Partial FC v2
(``recognition/arcface_torch/partial_fc_v2.py`` with its ``CombinedMarginLoss``), written for this
project so that the benchmark compares against it in the same run:

* the embeddings of the global batch are all-gathered (reduce-scattered in the backward);
* with ``sample_rate < 1`` the positives plus random negatives are picked from one random key per
  local class and copied out of the weight (``weight[index]``, autograd-tracked: its backward builds
  a dense zero ``[C_local, D]`` gradient and scatters into it);
* ``normalize(weight)`` makes a normalised copy of the (sampled) weight; ``linear`` gives fp32 logits
  ``[B, C]``, clamped to [-1, 1] out of place (the clamp keeps its input for the backward);
* the ArcFace margin runs in place without autograd over the WHOLE tensor (arccos, add ``m`` on the
  targets, cos), then ``logits * s`` is a new ``[B, C]`` tensor;
* the distributed softmax cross-entropy turns that tensor into probabilities in place and keeps it
  (the loss clamps target probabilities at 1e-30, as Partial FC v2 does: at s=64 and random
  centers every sample's loss reads 69.08);
  its backward subtracts a dense one-hot ``[P, C]`` (P = samples whose label is local) and returns
  a new ``[B, C]`` gradient.

So about five ``[B, C_local]`` fp32 tensors are alive at the peak, plus a normalised copy of the
weight and its gradient. Loss and gradients equal :class:`ffc_parallel.ShardedClassifier` with the
ArcFace margin (``m2 = 0.5``) as long as no target angle passes ``pi - m2`` and no target probability
falls under the clamp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ffc_parallel.distributed.collectives import all_reduce_, gather_rows
from ffc_parallel.distributed.init import get_rank, get_world_size
from ffc_parallel.heads.classifier import init_class_rows, shard_range


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of full logits ``[B, C_local]`` sharded over ``group``; ``labels[B]`` are
    local columns or -1. The logits tensor is overwritten with the probabilities and kept."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        row_max = all_reduce_(logits.amax(dim=1, keepdim=True), dist.ReduceOp.MAX, group)
        probs = logits.sub_(row_max).exp_()
        probs.div_(all_reduce_(probs.sum(dim=1, keepdim=True), dist.ReduceOp.SUM, group))
        owned = (labels >= 0).nonzero().squeeze(1)
        target_prob = torch.zeros(logits.shape[0], 1, dtype=probs.dtype, device=probs.device)
        target_prob[owned] = probs[owned].gather(1, labels[owned].unsqueeze(1))
        all_reduce_(target_prob, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(probs, labels, owned)
        return target_prob.clamp_min_(1e-30).log_().mean().neg()

    @staticmethod
    def backward(ctx, grad_loss):
        probs, labels, owned = ctx.saved_tensors
        one_hot = torch.zeros(owned.numel(), probs.shape[1], dtype=probs.dtype, device=probs.device)
        one_hot.scatter_(1, labels[owned].unsqueeze(1), 1.0)
        probs[owned] -= one_hot
        probs.div_(probs.shape[0])
        return probs * grad_loss, None, None


class FullLogitsHead(nn.Module):
    """ArcFace (``s``, ``m``) over ``num_classes`` classes sharded across ``group``, full logits.

    ``weight[num_local, dim]`` holds the same rows as ``fp.ShardedClassifier(dim, num_classes,
    seed=seed)`` on this rank. ``forward(local_x[b, dim], local_y[b])`` returns the mean loss over
    the global batch.
    """

    def __init__(self, dim: int, num_classes: int, sample_rate: float = 1.0, s: float = 64.0,
                 m: float = 0.5, *, seed: int = 0, init_std: float = 0.01, group=None):
        super().__init__()
        self.group, self.sample_rate, self.s, self.m = group, float(sample_rate), float(s), float(m)
        self.class_range = shard_range(num_classes, get_world_size(group), get_rank(group))
        self.num_local = self.class_range[1] - self.class_range[0]
        self.weight = nn.Parameter(init_class_rows(*self.class_range, dim, init_std, seed))
        self.generator = torch.Generator().manual_seed(seed * 7919 + get_rank(group))

    def _sample(self, labels: torch.Tensor):
        """``(index[S], labels)``: positives plus random negatives by the largest random keys."""
        owned = labels >= 0
        positives = labels[owned].unique()
        num_sample = int(self.sample_rate * self.num_local)
        if num_sample <= positives.numel():
            index = positives
        else:
            keys = torch.rand(self.num_local, generator=self.generator)
            keys[positives] = 2.0
            index = keys.topk(num_sample).indices.sort().values
        labels = labels.clone()
        labels[owned] = torch.searchsorted(index, labels[owned])
        return index, labels

    def forward(self, local_x: torch.Tensor, local_y: torch.Tensor) -> torch.Tensor:
        sizes = [local_x.shape[0]] * get_world_size(self.group)
        x = gather_rows(local_x, sizes, self.group)
        labels = gather_rows(local_y.long(), sizes, self.group)
        start, stop = self.class_range
        owned = (labels >= start) & (labels < stop)
        labels = torch.where(owned, labels - start, torch.full_like(labels, -1))
        weight = self.weight
        if self.sample_rate < 1.0:
            index, labels = self._sample(labels)
            weight = self.weight[index]
        logits = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1.0, 1.0)
        rows = (labels >= 0).nonzero().squeeze(1)
        with torch.no_grad():  # the margin, in place over the whole tensor, outside autograd
            logits.arccos_()
            logits[rows, labels[rows]] += self.m
            logits.cos_()
        return _DistributedSoftmaxCE.apply(logits * self.s, labels, self.group)
